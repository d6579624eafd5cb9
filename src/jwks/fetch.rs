//! Fetching a JWKS (and the OIDC discovery document) over HTTP: bounded in time
//! and size, conditional on the ETag, honest about Cache-Control.

use std::time::Duration;

use reqwest::header::{CACHE_CONTROL, ETAG, IF_NONE_MATCH};
use reqwest::{Client, StatusCode};

use super::{KeySet, KeySetError, MAX_JWKS_BYTES};

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("request to {url} failed: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url} sent more than {MAX_JWKS_BYTES} bytes")]
    TooLarge { url: String },
    #[error("{url}: {source}")]
    Invalid { url: String, source: KeySetError },
    #[error("discovery at {url}: {reason}")]
    Discovery { url: String, reason: String },
}

pub enum Fetched {
    New {
        set: KeySet,
        /// The document as received, for the on-disk cache.
        raw: Vec<u8>,
        etag: Option<String>,
        max_age: Option<Duration>,
    },
    NotModified {
        max_age: Option<Duration>,
    },
}

#[derive(Clone)]
pub struct Fetcher {
    client: Client,
}

impl Default for Fetcher {
    fn default() -> Self {
        Self::new()
    }
}

impl Fetcher {
    pub fn new() -> Self {
        let client = Client::builder()
            .user_agent(concat!("valet/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_default();
        Fetcher { client }
    }

    pub async fn jwks(
        &self,
        url: &str,
        etag: Option<&str>,
        timeout: Duration,
    ) -> Result<Fetched, FetchError> {
        let mut req = self
            .client
            .get(url)
            .timeout(timeout)
            .header("accept", "application/json");
        if let Some(tag) = etag {
            req = req.header(IF_NONE_MATCH, tag);
        }
        let resp = req.send().await.map_err(|e| http_error(url, e))?;
        let max_age = max_age(
            resp.headers()
                .get(CACHE_CONTROL)
                .and_then(|v| v.to_str().ok()),
        );
        if resp.status() == StatusCode::NOT_MODIFIED && etag.is_some() {
            return Ok(Fetched::NotModified { max_age });
        }
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url.into(),
                status: resp.status().as_u16(),
            });
        }
        let new_etag = resp
            .headers()
            .get(ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let raw = read_capped(url, resp).await?;
        let set = KeySet::parse(&raw).map_err(|source| FetchError::Invalid {
            url: url.into(),
            source,
        })?;
        Ok(Fetched::New {
            set,
            raw,
            etag: new_etag,
            max_age,
        })
    }

    /// `jwks_uri` from `{issuer}/.well-known/openid-configuration`, whose `issuer`
    /// must be the configured one exactly (OpenID Connect Discovery §4.3).
    pub async fn discover(&self, issuer: &str, timeout: Duration) -> Result<String, FetchError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let fail = |reason: String| FetchError::Discovery {
            url: url.clone(),
            reason,
        };
        let resp = self
            .client
            .get(&url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| http_error(&url, e))?;
        if !resp.status().is_success() {
            return Err(FetchError::Status {
                url: url.clone(),
                status: resp.status().as_u16(),
            });
        }
        let raw = read_capped(&url, resp).await?;
        let doc: serde_json::Value =
            serde_json::from_slice(&raw).map_err(|e| fail(format!("not JSON: {e}")))?;
        let found = doc.get("issuer").and_then(|v| v.as_str()).unwrap_or("");
        if found != issuer {
            return Err(fail(format!("issuer is {found:?}, configured {issuer:?}")));
        }
        let jwks_uri = doc
            .get("jwks_uri")
            .and_then(|v| v.as_str())
            .ok_or_else(|| fail("no jwks_uri".into()))?;
        match reqwest::Url::parse(jwks_uri) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(jwks_uri.to_string()),
            _ => Err(fail(format!("jwks_uri {jwks_uri:?} is not an http(s) URL"))),
        }
    }
}

fn http_error(url: &str, e: reqwest::Error) -> FetchError {
    let reason = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        // Without the URL (already given) and without the source chain's noise.
        e.without_url().to_string()
    };
    FetchError::Http {
        url: url.into(),
        reason,
    }
}

async fn read_capped(url: &str, mut resp: reqwest::Response) -> Result<Vec<u8>, FetchError> {
    if resp.content_length().is_some_and(|n| n > MAX_JWKS_BYTES) {
        return Err(FetchError::TooLarge { url: url.into() });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| http_error(url, e))? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES as usize {
            return Err(FetchError::TooLarge { url: url.into() });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `max-age` from Cache-Control; `no-cache`/`no-store` mean "as often as allowed".
pub fn max_age(header: Option<&str>) -> Option<Duration> {
    let header = header?;
    let mut age = None;
    for directive in header.split(',').map(str::trim) {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(v) = lower.strip_prefix("max-age=") {
            age = v.trim_matches('"').parse().ok().map(Duration::from_secs);
        }
    }
    age
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control() {
        assert_eq!(
            max_age(Some("public, max-age=600")),
            Some(Duration::from_secs(600))
        );
        assert_eq!(
            max_age(Some("max-age=\"60\"")),
            Some(Duration::from_secs(60))
        );
        assert_eq!(max_age(Some("no-store")), Some(Duration::ZERO));
        assert_eq!(max_age(Some("public")), None);
        assert_eq!(max_age(Some("max-age=abc")), None);
        assert_eq!(max_age(None), None);
    }
}
