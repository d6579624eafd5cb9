//! Against a real OpenID provider: npm `oidc-provider`, installed by
//! scripts/install-idp.sh and started here on 127.0.0.1. Valet finds its keys by
//! discovery, verifies its JWT access tokens, follows its key rotation, and denies
//! a token minted for another resource.

use crate::common;
use crate::common::idp;

use std::time::Instant;

use common::*;
use idp::{Idp, ORDERS, OTHER, jwt_header};

fn kid(token: &str) -> String {
    jwt_header(token)["kid"].as_str().unwrap_or("").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_from_a_real_openid_provider() {
    // Its own IdP: it rotates the keys.
    let idp = Idp::start();
    let config = format!(
        "providers:\n  - name: idp\n    issuer: {}\n    audiences: [\"https://orders.example/\"]\n    jwks: {{ discovery: true }}\n    claims_to_headers: {{ client_id: x-client-id }}\nroutes:\n  - name: orders\n    match: {{ path_prefix: /orders }}\n    require: {{ scopes: [orders:read] }}\n",
        idp.issuer
    );
    let v = Valet::in_process_ready(&config).await;
    let mut c = v.client().await;

    let t1 = idp.token(ORDERS, "orders:read").await;
    let a = check(&mut c, get("/orders/1").bearer(&t1)).await;
    assert!(a.allowed(), "{a:?}");
    assert_eq!(
        a.headers.get("x-client-id").map(String::as_str),
        Some("valet-test")
    );

    // Scope too small: 403. Another resource's token: not for us.
    let write_only = idp.token(ORDERS, "orders:write").await;
    assert_eq!(
        check(&mut c, get("/orders/1").bearer(&write_only))
            .await
            .reason(),
        "insufficient_scope"
    );
    let other = idp.token(OTHER, "orders:read").await;
    let a = check(&mut c, get("/orders/1").bearer(&other)).await;
    assert_eq!(
        (a.http_status, a.reason().as_str()),
        (401, "audience_not_allowed")
    );

    // The IdP rotates and signs with the new key at once.
    idp.admin("/__rotate").await;
    let t2 = idp.token(ORDERS, "orders:read").await;
    assert_ne!(kid(&t1), kid(&t2), "the IdP signs with a new key");
    let started = Instant::now();
    let a = check(&mut c, get("/orders/1").bearer(&t2)).await;
    eprintln!(
        "oidc-provider rotation: new kid {} accepted on the first Check, in {:.1} ms",
        kid(&t2),
        started.elapsed().as_secs_f64() * 1e3
    );
    assert!(a.allowed(), "{a:?}");
    // Old tokens keep working while the old key is published.
    assert!(check(&mut c, get("/orders/1").bearer(&t1)).await.allowed());
}
