//! Writes one gRPC request body (length-prefixed message) holding a CheckRequest,
//! for h2load's `-d`: 1 byte compressed flag 0, 4 bytes big-endian length, then
//! the protobuf. The request is what Envoy sends for GET /orders/7 to the shipped
//! config/valet.yaml, with a token minted by config/dev-signing-key.pem.
//!
//!   cargo run --release --example check_body -- --out /tmp/allow.bin
//!   cargo run --release --example check_body -- --out /tmp/missing.bin --no-token
//!
//! `--decode-response FILE` instead reads a gRPC response body (as `nghttp` saves
//! it) and prints the CheckResponse in one line: `ALLOW ...` or `DENY ...`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use envoy_types::ext_authz::v3::pb::{CheckRequest, CheckResponse, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use jsonwebtoken::{Algorithm, Header};
use prost::Message;
use serde_json::json;

#[path = "../tests/it/common/pem_key.rs"]
mod pem_key;

#[derive(Parser)]
struct Args {
    /// Where to write the body.
    #[arg(long, required_unless_present = "decode_response")]
    out: Option<PathBuf>,
    /// Print the CheckResponse in this gRPC response body instead.
    #[arg(long, conflicts_with = "out")]
    decode_response: Option<PathBuf>,
    /// Leave out the authorization header (a missing_token Check).
    #[arg(long)]
    no_token: bool,
    #[arg(long, default_value = "/orders/7")]
    path: String,
    #[arg(long, default_value = "GET")]
    method: String,
    /// RSA private key in PEM; the token is RS256.
    #[arg(long, default_value = "config/dev-signing-key.pem")]
    key: PathBuf,
    #[arg(long, default_value = "dev-1")]
    kid: String,
    #[arg(long, default_value = "https://idp.example.com/")]
    iss: String,
    #[arg(long, default_value = "orders-api")]
    aud: String,
    /// Space-separated scopes.
    #[arg(long, default_value = "orders:read")]
    scope: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    if let Some(path) = &args.decode_response {
        return decode_response(path);
    }
    let out = args.out.as_ref().expect("clap requires --out");
    let mut headers: HashMap<String, String> = [
        (":authority", "api.example.com"),
        (":method", args.method.as_str()),
        (":path", args.path.as_str()),
        (":scheme", "https"),
        ("accept", "application/json"),
        ("accept-encoding", "gzip, deflate, br"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) orders-web/2.14.1",
        ),
        ("x-forwarded-for", "203.0.113.7"),
        ("x-forwarded-proto", "https"),
        ("x-request-id", "0f6c2b8e-7a41-4d3b-bc39-5e2a9d1f4c77"),
        (
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    if !args.no_token {
        headers.insert("authorization".into(), format!("Bearer {}", mint(&args)?));
    }
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "13859305421738719487".into(),
                    method: args.method.clone(),
                    path: args.path.clone(),
                    host: "api.example.com".into(),
                    scheme: "https".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let message = request.encode_to_vec();
    let mut body = Vec::with_capacity(5 + message.len());
    body.push(0);
    body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
    body.extend_from_slice(&message);
    std::fs::write(out, &body)?;
    Ok(())
}

/// An RS256 token for the shipped config, valid for 24 hours.
fn mint(args: &Args) -> Result<String, Box<dyn std::error::Error>> {
    let key = pem_key::encoding_key(&std::fs::read(&args.key)?, Algorithm::RS256)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = json!({
        "iss": args.iss,
        "aud": args.aud,
        "sub": "alice",
        "iat": now,
        "exp": now + 24 * 3600,
        "scope": args.scope,
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(args.kid.clone());
    Ok(jsonwebtoken::encode(&header, &claims, &key)?)
}

/// One line per response: the gRPC-level outcome is in the trailers, this is the
/// decision inside the message.
fn decode_response(path: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    let body = std::fs::read(path)?;
    if body.len() < 5 || body[0] != 0 {
        return Err(format!("{}: not an uncompressed gRPC message", path.display()).into());
    }
    let len = u32::from_be_bytes(body[1..5].try_into()?) as usize;
    let message = body.get(5..5 + len).ok_or("truncated gRPC message")?;
    let response = CheckResponse::decode(message)?;
    let code = response.status.as_ref().map_or(0, |s| s.code);
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) if code == 0 => {
            let set: Vec<String> = ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .map(|h| format!("{}={}", h.key, h.value))
                .collect();
            println!(
                "ALLOW status={code} set=[{}] remove=[{}]",
                set.join(","),
                ok.headers_to_remove.join(",")
            );
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            println!(
                "DENY status={code} http={} body={}",
                d.status.map_or(0, |s| s.code),
                d.body
            );
        }
        other => println!("OTHER status={code} response={other:?}"),
    }
    Ok(())
}
