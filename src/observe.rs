//! What a Valet reports about each decision besides metrics: the audit trail,
//! the last denials (`/denials`), the Check's span and the misuse signals.
//! Made at start (the ring's size and the tracer are read then); the audit
//! settings of the policy in force are read per Check. With all of them off,
//! a Check costs a branch or two here and builds nothing.

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use opentelemetry::KeyValue;
use tonic::metadata::MetadataMap;

use crate::audit::{Facts, RecentDenials, Trail};
use crate::clock::Clock;
use crate::decision::Decision;
use crate::misuse::Watch;
use crate::otel::{CheckSpan, Tracer};
use crate::policy::Policy;
use crate::trace_context::Parent;

pub struct Observer {
    trail: Trail,
    denials: RecentDenials,
    tracer: Option<Tracer>,
    /// Made when the policy at start has `misuse:`; its settings are read per Check.
    misuse: Option<Watch>,
    clock: Clock,
}

impl Observer {
    /// For `policy` as loaded at start; its `tracing:` starts the exporter,
    /// hence inside the Valet's runtime.
    pub fn new(policy: &Policy, clock: Clock) -> Observer {
        if policy.audit.on() || policy.tracing.is_some() {
            crate::telemetry::observe_started();
        }
        if policy.misuse.is_some() {
            crate::telemetry::misuse_started(policy.providers.iter().map(|p| &*p.name));
        }
        let tracer = policy
            .tracing
            .as_ref()
            .and_then(|t| match Tracer::start(t) {
                Ok(tracer) => {
                    tracing::info!(
                        endpoint = %t.endpoint,
                        sample_ratio = t.sample_ratio,
                        "tracing: a span per Check, exported over OTLP/gRPC"
                    );
                    Some(tracer)
                }
                Err(e) => {
                    tracing::error!("tracing off: {e}");
                    None
                }
            });
        Observer {
            trail: Trail::new(),
            denials: RecentDenials::new(policy.audit.recent_denials),
            tracer,
            misuse: policy.misuse.as_ref().map(Watch::new),
            clock,
        }
    }

    /// Nothing observed: no trail, no ring, no span.
    pub fn off() -> Observer {
        Observer {
            trail: Trail::new(),
            denials: RecentDenials::new(0),
            tracer: None,
            misuse: None,
            clock: Clock::system(),
        }
    }

    /// The span of a Check about to be decided; None when tracing is off.
    pub fn span(&self, req: &CheckRequest, caller: Option<&MetadataMap>) -> Option<CheckSpan> {
        self.tracer
            .as_ref()
            .map(|t| t.check_span(req, caller.and_then(parent_of)))
    }

    /// One Check decided under `policy`.
    pub fn decided(
        &self,
        policy: &Policy,
        decision: &Decision,
        req: Option<&CheckRequest>,
        caller: Option<&MetadataMap>,
        span: Option<CheckSpan>,
    ) {
        let audit = &policy.audit;
        let recording = span.as_ref().is_some_and(CheckSpan::is_recording);
        let misuse = self.misuse.as_ref().zip(policy.misuse.as_ref());
        let wanted = recording
            || misuse.is_some()
            || if decision.is_allow() {
                audit.allow && audit.sample > 0.0
            } else {
                (audit.deny && audit.sample > 0.0) || self.denials.capacity() > 0
            };
        if !wanted {
            if let Some(span) = span {
                span.finish(false, Vec::new);
            }
            return;
        }
        let facts = Facts::of(decision, req, caller.and_then(parent_of));
        self.trail.record(audit, &facts);
        self.denials.push(&facts);
        if let Some((watch, settings)) = misuse {
            watch.observe(settings, policy, decision, req, &facts, self.clock.unix());
        }
        if let Some(span) = span {
            span.finish(facts.status >= 500, || span_attributes(&facts));
        }
    }

    pub fn denials(&self) -> &RecentDenials {
        &self.denials
    }
}

/// The span a gRPC call's metadata names (`traceparent`, B3).
fn parent_of(meta: &MetadataMap) -> Option<Parent<'_>> {
    Parent::extract(|n| meta.get(n).and_then(|v| v.to_str().ok()))
}

/// The Check span's attributes: never the token nor whole claims; the
/// subject on allow only.
fn span_attributes(f: &Facts<'_>) -> Vec<KeyValue> {
    let mut a = vec![
        KeyValue::new("valet.route", f.route.to_owned()),
        KeyValue::new("valet.decision", f.decision()),
        KeyValue::new("valet.reason", f.reason),
        KeyValue::new("http.response.status_code", i64::from(f.status)),
    ];
    let mut text = |key: &'static str, v: &str| {
        if !v.is_empty() {
            a.push(KeyValue::new(key, crate::audit::field(v, 256).into_owned()));
        }
    };
    text("valet.provider", f.provider);
    text("valet.kid", f.kid);
    text("valet.client_id", f.client_id().unwrap_or(""));
    if f.allow {
        text("valet.subject", f.subject().unwrap_or(""));
    }
    if f.dry_run {
        a.push(KeyValue::new("valet.dry_run", true));
    }
    a
}
