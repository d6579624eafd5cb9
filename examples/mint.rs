//! Mints test tokens, and prints the JWKS for a signing key.
//!
//!   cargo run -q --example mint -- --scope orders:read           # a token for config/valet.yaml
//!   cargo run -q --example mint -- --jwks > config/jwks.json      # the public key set
//!
//! Development only: the key in config/ is public and must never sign real tokens.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Map, Value, json};

#[path = "../tests/it/common/pem_key.rs"]
mod pem_key;

#[derive(Parser)]
struct Args {
    /// PEM private key (RSA, EC or Ed25519).
    #[arg(long, default_value = "config/dev-signing-key.pem")]
    key: std::path::PathBuf,
    #[arg(long, default_value = "RS256")]
    alg: String,
    #[arg(long, default_value = "dev-1")]
    kid: String,
    /// Print the JWKS holding the key's public half instead of a token.
    #[arg(long)]
    jwks: bool,
    #[arg(long, default_value = "https://idp.example.com/")]
    iss: String,
    #[arg(long, default_value = "orders-api")]
    aud: String,
    #[arg(long, default_value = "alice")]
    sub: String,
    /// Space-separated scopes.
    #[arg(long, default_value = "")]
    scope: String,
    /// Lifetime in seconds; negative mints an expired token.
    #[arg(long, default_value_t = 3600, allow_hyphen_values = true)]
    ttl: i64,
    /// Extra claims, name=value (value parsed as JSON when it parses).
    #[arg(long = "claim")]
    claims: Vec<String>,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let alg: Algorithm = args.alg.parse()?;
    let pem = std::fs::read(&args.key)?;
    let key = pem_key::encoding_key(&pem, alg)?;
    if args.jwks {
        let mut jwk = Jwk::from_encoding_key(&key, alg)?;
        jwk.common.key_id = Some(args.kid);
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Signature);
        println!(
            "{}",
            serde_json::to_string_pretty(&JwkSet { keys: vec![jwk] })?
        );
        return Ok(());
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    let mut claims = Map::new();
    claims.insert("iss".into(), json!(args.iss));
    claims.insert("aud".into(), json!(args.aud));
    claims.insert("sub".into(), json!(args.sub));
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + args.ttl));
    if !args.scope.is_empty() {
        claims.insert("scope".into(), json!(args.scope));
    }
    for c in &args.claims {
        let (k, v) = c.split_once('=').ok_or("--claim takes name=value")?;
        let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
        claims.insert(k.into(), v);
    }
    let mut header = Header::new(alg);
    header.kid = Some(args.kid);
    println!("{}", jsonwebtoken::encode(&header, &claims, &key)?);
    Ok(())
}
