//! Every integration suite in one test binary (one link instead of one per suite),
//! a module per suite: `cargo test --test it check::` runs one suite,
//! `cargo test --test it check::tokens_expire` one test. Shared helpers are in
//! `common`; fixtures stay in `tests/fixtures`, the OpenID provider in `tests/idp`.

mod common;

mod adversarial;
mod api_keys;
mod audit;
mod binding;
mod check;
mod cli;
mod differential;
mod envoy;
mod envoy_identity;
mod envoy_tracing;
mod faults;
mod fleet;
mod floods_caches;
mod floods_conn;
mod floods_forged;
mod floods_intro;
mod fuzz;
mod http_mode;
mod http_proxies;
mod identity;
mod idp_contract;
mod introspection;
mod jwks;
mod lifecycle;
mod metrics;
mod misuse;
mod oidc;
mod otlp;
mod reload;
mod revocation;
mod revocation_uri;
