//! A real OpenID provider for integration tests: npm `oidc-provider` (tests/idp/server.mjs,
//! installed by scripts/install-idp.sh), started on 127.0.0.1 with a free port, plus
//! DPoP proof minting (RFC 9449) and the test client certificate for mTLS-bound
//! tokens (RFC 8705).
//!
//! Self-contained (it uses nothing else of `common`): `use crate::common::idp;`.
//!
//! What the IdP issues (see the header of tests/idp/server.mjs for the details):
//! * [`Idp::token`]: RS256 JWT access tokens (`typ: at+jwt`) for a resource, client
//!   `valet-test`.
//! * [`Idp::opaque_token`]: opaque tokens (client `valet-opaque`), to be checked at the
//!   RFC 7662 endpoint given by [`Idp::introspection`]; [`Idp::revoke`] revokes them.
//! * [`Idp::dpop_token`]: DPoP-bound JWTs, `cnf.jkt` = the proof key's thumbprint.
//! * [`Idp::mtls_token`]: JWTs with `cnf["x5t#S256"]` of a certificate the test passes
//!   in a header (no TLS listener involved), e.g. [`CLIENT_CERT_PEM`].

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

/// Resources the IdP knows (RFC 8707 `resource` values; they become `aud`).
pub const ORDERS: &str = "https://orders.example/";
/// Accepts the same scopes as [`ORDERS`] (plus `other:read`): for wrong-`aud` tokens.
pub const OTHER: &str = "https://other.example/";

/// Client whose tokens are JWTs (also DPoP-bound ones).
pub const JWT_CLIENT: (&str, &str) = ("valet-test", "valet-test-secret");
/// Client whose tokens are opaque (introspection only).
pub const OPAQUE_CLIENT: (&str, &str) = ("valet-opaque", "valet-opaque-secret");
/// Client whose tokens are bound to the certificate in the `x-client-cert` header.
pub const MTLS_CLIENT: (&str, &str) = ("valet-mtls", "valet-mtls-secret");
/// The resource server's credentials at the introspection endpoint.
pub const INTROSPECTOR: (&str, &str) = ("valet-introspector", "valet-introspector-secret");
/// Request header the IdP reads the "TLS client certificate" (PEM) from.
pub const CLIENT_CERT_HEADER: &str = "x-client-cert";

/// A self-signed P-256 client certificate (CN=valet-test-client, clientAuth, valid
/// 2000-01-01 .. 2099-12-31). Only its bytes matter: the IdP binds tokens to
/// SHA-256(DER); there is no private key here and nothing verifies the chain.
pub const CLIENT_CERT_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBfTCCASOgAwIBAgIBATAKBggqhkjOPQQDAjAcMRowGAYDVQQDDBF2YWxldC10
ZXN0LWNsaWVudDAgFw0wMDAxMDEwMDAwMDBaGA8yMDk5MTIzMTIzNTk1OVowHDEa
MBgGA1UEAwwRdmFsZXQtdGVzdC1jbGllbnQwWTATBgcqhkjOPQIBBggqhkjOPQMB
BwNCAASMkw2Y9CmSAeuVxreZnnaspc7CDXlWSjbuI+DT3EBD0yCrEN9qtvg4GDtw
xIsLeS2bqhwaKbhUtw/hQjdcOLUdo1QwUjAMBgNVHRMBAf8EAjAAMA4GA1UdDwEB
/wQEAwIHgDATBgNVHSUEDDAKBggrBgEFBQcDAjAdBgNVHQ4EFgQUtJJk/Kno6pRM
UVoBs+puT14U/UkwCgYIKoZIzj0EAwIDSAAwRQIgZSGvfha0ITV9WuheDRp7d5I3
AjU2kU1YQQVPK6poR+8CIQDzlIO62MLI8iqMFtq769Sm4VLO79eoIxtrEAU5NDY6
Pg==
-----END CERTIFICATE-----
";
/// `x5t#S256` of [`CLIENT_CERT_PEM`], computed with
/// `openssl x509 -outform der | openssl dgst -sha256 -binary | basenc --base64url`.
pub const CLIENT_CERT_X5T_S256: &str = "PJAwaM5ARjCDBtKmh6cFv0vlhN6cQYTD76M9pNbOX4U";

/// A running tests/idp/server.mjs: a test's own ([`Idp::start`], killed on drop) or a
/// handle on the process's shared one ([`Idp::shared`]).
pub struct Idp {
    /// The server and the write end of its stdin, for a test's own IdP; `None` for a
    /// handle on the shared one. The server exits when its stdin closes
    /// (IDP_EXIT_WITH_STDIN), so no IdP outlives the test process, however it ends.
    own: Option<(Child, ChildStdin)>,
    /// `http://127.0.0.1:<port>`, no trailing slash (as in its discovery document).
    pub issuer: String,
    stderr: Arc<Mutex<String>>,
    http: reqwest::Client,
}

impl Idp {
    /// Starts the IdP (VALET_IDP_SERVER, else tests/idp/server.mjs) and waits for it.
    /// For a test that rotates keys, reads [`Idp::introspection_stats`] as absolute
    /// counts, or needs the IdP's full attention; else use [`Idp::shared`].
    pub fn start() -> Idp {
        Idp::start_with(&[])
    }

    /// The one default IdP of this test process (started by the first caller, ~1 cpu-s
    /// of node saved per test that shares it), for tests that only need its tokens,
    /// introspection and revocation: never `/__rotate` or `/__retire` it, and read
    /// its [`Idp::introspection_stats`] only as deltas that other tests may add to.
    /// It lives as long as the test process (a static is never dropped; the server
    /// exits when the process's end closes its stdin). Each handle has its own HTTP
    /// client: a pooled connection must not outlive the test runtime that opened it.
    pub fn shared() -> Idp {
        static SHARED: OnceLock<Idp> = OnceLock::new();
        let idp = SHARED.get_or_init(Idp::start);
        Idp {
            own: None,
            issuer: idp.issuer.clone(),
            stderr: idp.stderr.clone(),
            http: reqwest::Client::new(),
        }
    }

    /// [`Idp::start`] with extra environment, e.g. `[("IDP_ACCESS_TOKEN_TTL", "2")]`.
    pub fn start_with(env: &[(&str, &str)]) -> Idp {
        let server = std::env::var_os("VALET_IDP_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/idp/server.mjs")
            });
        let modules = server.parent().unwrap().join("node_modules/oidc-provider");
        assert!(
            modules.exists(),
            "oidc-provider is not installed: run scripts/test.sh (or scripts/install-idp.sh) first"
        );
        let mut child = Command::new("node")
            .arg(&server)
            .arg("0")
            .env("IDP_EXIT_WITH_STDIN", "1")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node runs");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(issuer) = line.strip_prefix("READY ") {
                    let _ = tx.send(issuer.trim().to_string());
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = stderr.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let issuer = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(i) => i,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the IdP did not start: {}", stderr.lock().unwrap());
            }
        };
        Idp {
            own: Some((child, stdin)),
            issuer,
            stderr,
            http: reqwest::Client::new(),
        }
    }

    /// What the IdP printed on stderr so far.
    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The token endpoint: the `htu` of a DPoP proof for it.
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }

    /// A JWT access token (client `valet-test`) for `resource` with `scope`.
    pub async fn token(&self, resource: &str, scope: &str) -> String {
        self.issue(JWT_CLIENT, Some(resource), scope, &[], "Bearer")
            .await
    }

    /// An opaque access token (client `valet-opaque`) for [`ORDERS`] with `scope`.
    pub async fn opaque_token(&self, scope: &str) -> String {
        self.opaque_token_for(Some(ORDERS), scope).await
    }

    /// An opaque access token for `resource` (its `aud`), or without `aud` for `None`.
    pub async fn opaque_token_for(&self, resource: Option<&str>, scope: &str) -> String {
        let t = self
            .issue(OPAQUE_CLIENT, resource, scope, &[], "Bearer")
            .await;
        assert_eq!(t.matches('.').count(), 0, "opaque token expected: {t}");
        t
    }

    /// A DPoP-bound JWT (`token_type` DPoP, `cnf.jkt`) for `resource`; `proof` is the
    /// DPoP proof for `POST` [`Idp::token_endpoint`], e.g. from [`DpopKey::proof`].
    /// Each proof can be used once (the IdP detects replays by `jti`).
    pub async fn dpop_token(&self, resource: &str, scope: &str, proof: &str) -> String {
        self.issue(
            JWT_CLIENT,
            Some(resource),
            scope,
            &[("dpop", proof)],
            "DPoP",
        )
        .await
    }

    /// A DPoP-bound opaque token: introspection shows `cnf.jkt` and `token_type` DPoP.
    pub async fn opaque_dpop_token(&self, resource: &str, scope: &str, proof: &str) -> String {
        self.issue(
            OPAQUE_CLIENT,
            Some(resource),
            scope,
            &[("dpop", proof)],
            "DPoP",
        )
        .await
    }

    /// A JWT bound to the certificate `cert_pem` (`cnf["x5t#S256"]`), which is sent
    /// URL-encoded in the [`CLIENT_CERT_HEADER`] header, as a TLS-terminating proxy would.
    pub async fn mtls_token(&self, resource: &str, scope: &str, cert_pem: &str) -> String {
        let cert = urlencode(cert_pem);
        self.issue(
            MTLS_CLIENT,
            Some(resource),
            scope,
            &[(CLIENT_CERT_HEADER, &cert)],
            "Bearer",
        )
        .await
    }

    /// The RFC 7662 endpoint and the credentials (client_secret_basic) to call it with.
    pub fn introspection(&self) -> (String, &'static str, &'static str) {
        (
            format!("{}/token/introspection", self.issuer),
            INTROSPECTOR.0,
            INTROSPECTOR.1,
        )
    }

    /// The IdP's introspection response for `token`, asked as the introspector.
    pub async fn introspect(&self, token: &str) -> Value {
        let (url, id, secret) = self.introspection();
        let (status, body) = self
            .post_form(&url, (id, secret), &[("token", token)], &[])
            .await;
        assert_eq!(status, 200, "introspection: {body}\n{}", self.logs());
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("introspection: {e}: {body}"))
    }

    /// Revokes an opaque token (RFC 7009) as its client, `valet-opaque` (oidc-provider
    /// lets only the client a token was issued to revoke it). JWTs are not stored:
    /// "revoking" one is a no-op.
    pub async fn revoke(&self, token: &str) {
        self.revoke_as(OPAQUE_CLIENT, token).await;
    }

    /// Revokes `token` authenticating as `client` (must be the token's client).
    pub async fn revoke_as(&self, client: (&str, &str), token: &str) {
        let url = format!("{}/token/revocation", self.issuer);
        let (status, body) = self
            .post_form(
                &url,
                client,
                &[("token", token), ("token_type_hint", "access_token")],
                &[],
            )
            .await;
        assert_eq!(status, 200, "revocation: {body}\n{}", self.logs());
    }

    /// A raw client_credentials request: (HTTP status, JSON body). For tests that
    /// expect an error (e.g. a replayed DPoP proof: 400 `invalid_dpop_proof`).
    pub async fn token_request(
        &self,
        client: (&str, &str),
        resource: Option<&str>,
        scope: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut form = vec![("grant_type", "client_credentials"), ("scope", scope)];
        if let Some(r) = resource {
            form.push(("resource", r));
        }
        let (status, body) = self
            .post_form(&self.token_endpoint(), client, &form, headers)
            .await;
        let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("token: {e}: {body}"));
        (status, json)
    }

    /// Requests that reached the introspection endpoint, and those it answered 429
    /// (with `IDP_INTROSPECTION_RPS`), since the IdP started: on [`Idp::shared`],
    /// other tests' requests included.
    pub async fn introspection_stats(&self) -> (u64, u64) {
        let body = self
            .http
            .get(format!("{}/__stats", self.issuer))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let v: Value = serde_json::from_str(&body).unwrap();
        (
            v["introspections"].as_u64().unwrap(),
            v["rate_limited"].as_u64().unwrap(),
        )
    }

    /// POST `path` on the admin API (`/__rotate`, `/__retire`).
    pub async fn admin(&self, path: &str) {
        let r = self
            .http
            .post(format!("{}{path}", self.issuer))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }

    async fn issue(
        &self,
        client: (&str, &str),
        resource: Option<&str>,
        scope: &str,
        headers: &[(&str, &str)],
        token_type: &str,
    ) -> String {
        let (status, json) = self.token_request(client, resource, scope, headers).await;
        assert_eq!(status, 200, "token request: {json}\n{}", self.logs());
        assert_eq!(json["token_type"], token_type, "{json}");
        json["access_token"].as_str().unwrap().to_string()
    }

    async fn post_form(
        &self,
        url: &str,
        (id, secret): (&str, &str),
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> (u16, String) {
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let basic = STANDARD.encode(format!("{}:{}", urlencode(id), urlencode(secret)));
        let mut req = self
            .http
            .post(url)
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.body(body).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.text().await.unwrap())
    }
}

impl Drop for Idp {
    fn drop(&mut self) {
        if let Some((child, _)) = &mut self.own {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A fresh P-256 key for DPoP proofs (ES256).
pub struct DpopKey {
    pair: EcdsaKeyPair,
    x: String,
    y: String,
}

impl DpopKey {
    pub fn generate() -> DpopKey {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        // Uncompressed SEC1 point: 0x04 || x (32) || y (32).
        let point = pair.public_key().as_ref();
        assert_eq!((point.len(), point[0]), (65, 4));
        let x = URL_SAFE_NO_PAD.encode(&point[1..33]);
        let y = URL_SAFE_NO_PAD.encode(&point[33..]);
        DpopKey { pair, x, y }
    }

    /// The public JWK `{kty, crv, x, y}` that goes in the proof header.
    pub fn jwk(&self) -> Value {
        json!({ "kty": "EC", "crv": "P-256", "x": self.x, "y": self.y })
    }

    /// RFC 7638 thumbprint of [`DpopKey::jwk`]: the `cnf.jkt` a bound token carries.
    pub fn thumbprint(&self) -> String {
        jwk_thumbprint(&self.jwk())
    }

    /// A DPoP proof for `htm` `htu`, `iat` now, a random `jti`, and `ath` (hash of
    /// `access_token`) when presenting a token to a resource server.
    pub fn proof(&self, htm: &str, htu: &str, access_token: Option<&str>) -> String {
        let mut claims = json!({
            "jti": random_id(),
            "htm": htm,
            "htu": htu,
            "iat": SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs(),
        });
        if let Some(t) = access_token {
            claims["ath"] = ath(t).into();
        }
        self.proof_with(&claims)
    }

    /// A proof with exactly these claims (for stale `iat`, wrong `htu`, reused `jti`...).
    pub fn proof_with(&self, claims: &Value) -> String {
        let header = json!({ "typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk() });
        self.sign(&header, claims)
    }

    /// Signs any header and claims with this key (ES256, JWS compact form).
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

/// RFC 7638 JWK thumbprint (SHA-256, base64url) of an EC, RSA, OKP or oct JWK.
pub fn jwk_thumbprint(jwk: &Value) -> String {
    let members: &[&str] = match jwk["kty"].as_str() {
        Some("EC") => &["crv", "kty", "x", "y"],
        Some("RSA") => &["e", "kty", "n"],
        Some("OKP") => &["crv", "kty", "x"],
        Some("oct") => &["k", "kty"],
        other => panic!("unsupported kty {other:?}"),
    };
    // Lexicographic member order, no whitespace: serde_json's map (a BTreeMap
    // without the preserve_order feature) writes keys sorted, but build the
    // string by hand so that does not matter.
    let canonical = members
        .iter()
        .map(|m| {
            let v = jwk[*m].as_str().unwrap_or_else(|| panic!("jwk lacks {m}"));
            format!("{}:{}", Value::from(*m), Value::from(v))
        })
        .collect::<Vec<_>>()
        .join(",");
    URL_SAFE_NO_PAD.encode(digest(&SHA256, format!("{{{canonical}}}").as_bytes()))
}

/// The DPoP `ath` claim for `access_token`: base64url(SHA-256(token)).
pub fn ath(access_token: &str) -> String {
    URL_SAFE_NO_PAD.encode(digest(&SHA256, access_token.as_bytes()))
}

/// RFC 8705 `x5t#S256` of a PEM certificate: base64url(SHA-256(DER)).
pub fn cert_thumbprint(pem: &str) -> String {
    let b64: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.trim().chars())
        .collect();
    let der = STANDARD.decode(b64).expect("PEM body is base64");
    URL_SAFE_NO_PAD.encode(digest(&SHA256, &der))
}

/// The JSON payload of a JWT (unverified).
pub fn jwt_payload(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

/// The JSON header of a JWT (unverified).
pub fn jwt_header(token: &str) -> Value {
    let part = token.split('.').next().unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).unwrap();
    URL_SAFE_NO_PAD.encode(b)
}

/// application/x-www-form-urlencoded / percent-encoding of everything but unreserved.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
