//! Times a bare RS256 verification with aws-lc (key parsed once, as Valet does),
//! of a token like `check_body`'s, for bench.sh's uncached budget: Valet's CPU per
//! uncached Check against the floor's plus this, measured in the same run.
//!
//!   cargo run --release --example verify_rs256 -- --loops 2000
//!
//! Prints one line: `rs256_verify_us <median µs of 5 batches>`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, RsaPublicKeyComponents};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use clap::Parser;
use jsonwebtoken::{Algorithm, Header};
use serde_json::{Value, json};

#[path = "../tests/it/common/pem_key.rs"]
mod pem_key;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2000)]
    loops: u32,
    #[arg(long, default_value = "config/dev-signing-key.pem")]
    key: std::path::PathBuf,
    #[arg(long, default_value = "config/jwks.json")]
    jwks: std::path::PathBuf,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let claims = json!({
        "iss": "https://idp.example.com/", "aud": "orders-api", "sub": "alice",
        "iat": now, "exp": now + 3600, "scope": "orders:read",
    });
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("dev-1".into());
    let key = pem_key::encoding_key(&std::fs::read(&args.key)?, Algorithm::RS256)?;
    let token = jsonwebtoken::encode(&header, &claims, &key)?;
    let jwks: Value = serde_json::from_slice(&std::fs::read(&args.jwks)?)?;
    let jwk = &jwks["keys"][0];
    let part = |name: &str| URL_SAFE_NO_PAD.decode(jwk[name].as_str().unwrap_or_default());
    let (n, e) = (part("n")?, part("e")?);
    let parsed = RsaPublicKeyComponents { n: &n, e: &e }
        .to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256)
        .map_err(|e| format!("{e}"))?;
    let (message, signature) = token.rsplit_once('.').ok_or("not a JWT")?;
    let signature = URL_SAFE_NO_PAD.decode(signature)?;
    let mut batches = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        for _ in 0..args.loops {
            parsed
                .verify_sig(message.as_bytes(), &signature)
                .map_err(|_| "signature does not verify")?;
        }
        batches.push(started.elapsed().as_secs_f64() * 1e6 / f64::from(args.loops));
    }
    batches.sort_by(f64::total_cmp);
    println!("rs256_verify_us {:.1}", batches[2]);
    Ok(())
}
