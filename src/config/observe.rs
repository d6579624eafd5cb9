//! The YAML mirror of what Valet reports about its decisions: the audit
//! trail (`audit:`), OpenTelemetry traces (`tracing:`) and token misuse
//! signals (`misuse:`). Shape only; `policy::observe` checks the values.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFile {
    /// One line per allowed Check.
    pub allow: Option<bool>,
    /// One line per denied Check.
    pub deny: Option<bool>,
    /// The share of decisions written, 0 to 1.
    pub sample: Option<f64>,
    /// Lines per second before the rest are only counted.
    pub max_per_second: Option<u32>,
    /// How many of the last denials the admin port keeps (`/denials`).
    pub recent_denials: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingFile {
    pub otlp: Option<OtlpFile>,
    /// The share of Checks without a parent span that are sampled, 0 to 1.
    pub sample_ratio: Option<f64>,
    pub service_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtlpFile {
    /// gRPC endpoint of the collector, `http://host:4317`.
    pub endpoint: String,
    pub timeout: Option<String>,
    /// gRPC metadata sent with every export (an API key of a vendor).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Spans waiting for export; past it a span is dropped and counted.
    pub queue: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MisuseFile {
    /// A verified token seen from more source addresses than this within its
    /// lifetime is reported once.
    pub max_addresses_per_token: Option<usize>,
    /// Tokens tracked at once (the oldest are forgotten first).
    pub tracked_tokens: Option<u64>,
    /// A client whose denials per minute pass this is reported once per minute.
    pub client_denials_per_minute: Option<u32>,
}
