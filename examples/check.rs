//! Sends one Check to a running Valet, as Envoy would, and prints the answer.
//!
//!   cargo run -q --example check -- --path /orders/7 --token "$(cargo run -q --example mint -- --scope orders:read)"

use std::collections::HashMap;

use clap::Parser;
use envoy_types::ext_authz::v3::pb::{CheckRequest, HttpResponse};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:9001")]
    addr: String,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    #[arg(long, default_value = "api.example.com")]
    host: String,
    /// Sent as `authorization: Bearer <token>`.
    #[arg(long)]
    token: Option<String>,
    /// Extra request headers, name:value.
    #[arg(long = "header")]
    headers: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut headers = HashMap::new();
    if let Some(t) = &args.token {
        headers.insert("authorization".to_string(), format!("Bearer {t}"));
    }
    for h in &args.headers {
        let (k, v) = h.split_once(':').ok_or("--header takes name:value")?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
    }
    let request = CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    method: args.method,
                    path: args.path,
                    host: args.host,
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let mut client = AuthorizationClient::connect(args.addr).await?;
    let response = client.check(request).await?.into_inner();
    let code = response.status.map_or(0, |s| s.code);
    match response.http_response {
        Some(HttpResponse::OkResponse(ok)) if code == 0 => {
            println!("ALLOW");
            for h in ok.headers.iter().filter_map(|h| h.header.as_ref()) {
                println!("  set    {}: {}", h.key, h.value);
            }
            for h in &ok.headers_to_remove {
                println!("  remove {h}");
            }
        }
        Some(HttpResponse::DeniedResponse(d)) => {
            println!(
                "DENY {} (grpc status {code})",
                d.status.map_or(403, |s| s.code)
            );
            for h in d.headers.iter().filter_map(|h| h.header.as_ref()) {
                println!("  {}: {}", h.key, h.value);
            }
            println!("  {}", d.body);
        }
        other => println!("grpc status {code}, response {other:?}"),
    }
    Ok(())
}
