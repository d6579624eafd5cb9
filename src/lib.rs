//! Valet: an Envoy ext_authz sidecar that checks OAuth 2.0 JWT access tokens
//! against per-route YAML policy. See design.md for the path of one Check.
#![forbid(unsafe_code)]

// The server's wiring, which has no unit tests and which nothing unit-tested uses, is
// left out of the unit-test build: it is most of the lib's generic code (the servers,
// their tasks), compiled again for `cargo test --lib` only to be linked and never run
// (that build: 0.8x of its CPU). The lib build compiles it and the `it` suites test it.
#[cfg(not(test))]
pub mod admin;
pub mod api_keys;
#[cfg(not(test))]
pub mod app;
pub mod audit;
pub mod bounded_cache;
pub mod check;
pub mod clock;
pub mod config;
pub mod conn;
pub mod decision;
pub mod driver;
pub mod envoy_config;
pub mod explain;
pub mod grpc_mux;
pub mod http_authz;
pub mod introspection;
pub mod jwks;
#[cfg(test)]
mod layers;
pub mod load;
pub mod metrics_contract;
pub mod misuse;
pub mod observe;
pub mod otel;
pub mod policy;
#[cfg(not(test))]
pub mod policy_test;
pub mod provider;
#[cfg(not(test))]
pub mod reload;
pub mod request;
pub mod response;
pub mod revocation;
pub mod shared_store;
/// Kept at its old path: the RFC 9728 documents are compiled policy now.
pub use policy::resource_metadata;
pub mod service;
pub mod state;
pub mod stores;
pub mod telemetry;
/// For the unit tests: the integration tests' temporary directories, shared by path.
#[cfg(test)]
#[path = "../tests/it/common/tempdir.rs"]
mod tempdir;
pub mod trace_context;
