//! A span per Check, exported over OTLP/gRPC: a child of the span Envoy
//! forwards in the CheckRequest (W3C or B3, see `trace_context`), with child
//! spans for an awaited key refetch or introspection. Off unless `tracing:` is
//! set, and then no span is built when none is wanted.
//!
//! Spans are built with the OpenTelemetry API and SDK directly, not through a
//! `tracing` layer: a Check would otherwise pay for a `tracing` span and its
//! bridge on every request, and Valet's spans would follow whichever global
//! subscriber the process has, not the Valet (several run in one test
//! process). Export goes through the OTLP crate's tonic exporter, fed by a
//! bounded queue of our own: a Check only `try_send`s its finished span, so a
//! slow or absent collector drops spans (`valet_trace_spans_dropped_total`)
//! and never slows a Check. (The SDK's batch processor exports from a thread
//! of its own, outside the runtime tonic needs, and keeps its drop count to itself.)

use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter, SpanProcessor,
};
use tokio::sync::mpsc;

use crate::policy::observe::Tracing;
use crate::telemetry;
use crate::trace_context::Parent;

/// Spans sent to the collector in one request, at most.
const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for others.
const LINGER: Duration = Duration::from_millis(200);

/// One Valet's tracer: its provider (sampler, resource) and export queue.
pub struct Tracer {
    tracer: SdkTracer,
    _provider: SdkTracerProvider,
    ratio: f64,
}

impl Tracer {
    /// Builds the exporter and starts its task: call inside the Valet's runtime.
    pub fn start(settings: &Tracing) -> Result<Tracer, String> {
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (k, v) in &settings.headers {
            let key = tonic::metadata::MetadataKey::from_bytes(k.as_bytes())
                .map_err(|e| format!("tracing.otlp.headers.{k}: {e}"))?;
            let value = v
                .parse()
                .map_err(|_| format!("tracing.otlp.headers.{k}: not a valid header value"))?;
            metadata.insert(key, value);
        }
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(settings.endpoint.clone())
            .with_timeout(settings.timeout)
            .with_metadata(metadata)
            .build()
            .map_err(|e| format!("tracing.otlp: {e}"))?;
        let resource = Resource::builder()
            .with_service_name(settings.service_name.clone())
            .build();
        exporter.set_resource(&resource);
        let (tx, rx) = mpsc::channel(settings.queue);
        telemetry::spawn(export(rx, exporter, settings.timeout));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue(tx))
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                settings.sample_ratio,
            ))))
            .with_resource(resource)
            .build();
        Ok(Tracer {
            tracer: provider.tracer("valet"),
            _provider: provider,
            ratio: settings.sample_ratio,
        })
    }

    /// The span of one Check: a child of `caller` (the span of the gRPC call,
    /// Envoy's ext_authz span), else of the one `req`'s headers name.
    pub fn check_span(&self, req: &CheckRequest, caller: Option<Parent<'_>>) -> CheckSpan {
        let parent = caller.or_else(|| Parent::extract(|n| crate::request::header_of(req, n)));
        let parent_cx = match parent {
            Some(p) => {
                // B3 may defer the decision: then it is ours, by the root ratio.
                let sampled = p
                    .sampled
                    .unwrap_or_else(|| rand::random::<f64>() < self.ratio);
                let state = p
                    .state
                    .and_then(|s| s.parse::<TraceState>().ok())
                    .unwrap_or_default();
                Context::new().with_remote_span_context(SpanContext::new(
                    TraceId::from_bytes(p.trace_id),
                    SpanId::from_bytes(p.span_id),
                    if sampled {
                        TraceFlags::SAMPLED
                    } else {
                        TraceFlags::default()
                    },
                    true,
                    state,
                ))
            }
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder("valet.check")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent_cx);
        CheckSpan {
            cx: parent_cx.with_span(span),
            tracer: self.tracer.clone(),
        }
    }
}

/// The span of one Check: ended by [`CheckSpan::finish`] (or when dropped).
pub struct CheckSpan {
    cx: Context,
    tracer: SdkTracer,
}

impl CheckSpan {
    /// Whether it is sampled: attributes are only worked out for a span that is.
    pub fn is_recording(&self) -> bool {
        self.cx.span().is_recording()
    }

    /// A child span (`valet.jwks.refetch`, `valet.introspection`) that ends when dropped.
    pub fn child(&self, name: &'static str, provider: &str) -> Option<Span> {
        if !self.is_recording() {
            return None;
        }
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start_with_context(&self.tracer, &self.cx);
        opentelemetry::trace::Span::set_attribute(
            &mut span,
            KeyValue::new("valet.provider", provider.to_owned()),
        );
        Some(span)
    }

    /// Sets the decision's attributes and ends the span. `attributes` runs only
    /// for a sampled span.
    pub fn finish(self, error: bool, attributes: impl FnOnce() -> Vec<KeyValue>) {
        let span = self.cx.span();
        if span.is_recording() {
            span.set_attributes(attributes());
            if error {
                span.set_status(Status::error("Valet could not decide"));
            }
        }
        span.end();
    }
}

/// The span processor: a finished span goes into the bounded queue, or is
/// counted as dropped. Never waits.
#[derive(Debug)]
struct Queue(mpsc::Sender<SpanData>);

impl SpanProcessor for Queue {
    fn on_start(&self, _: &mut Span, _: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.0.try_send(span).is_err() {
            telemetry::trace_spans_dropped("queue_full", 1);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Sends queued spans in batches, one request at a time, each bounded by
/// `timeout`; a batch that fails is dropped and counted (the queue keeps
/// filling meanwhile, and overflows into `queue_full`).
async fn export(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    timeout: Duration,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        if batch.len() < MAX_BATCH {
            tokio::time::sleep(LINGER).await;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
        }
        let spans = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
        let n = spans.len() as u64;
        match tokio::time::timeout(timeout, exporter.export(spans)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, spans = n, "span export failed");
                telemetry::trace_spans_dropped("export_failed", n);
            }
            Err(_) => telemetry::trace_spans_dropped("export_failed", n),
        }
    }
}
