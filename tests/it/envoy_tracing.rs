//! Real Envoy 1.40 with its OpenTelemetry tracer, and Valet, both sending spans
//! to one OTLP receiver: Valet's span of a Check is a child of Envoy's ext_authz
//! span, in the same trace as Envoy's span of the request.

use crate::common;
use crate::envoy::{POLICY, envoy_config, request, start_ready, validate};

use std::time::Instant;

use common::otlp::Receiver;
use common::tools::{envoy_path, free_port};
use common::*;

/// examples/envoy.yaml with Envoy's OpenTelemetry tracer sending every request's
/// spans to `otlp_port` (flushed at once, not every 5 s).
fn traced_envoy_config(
    listener: u16,
    valet: u16,
    upstream: u16,
    admin: u16,
    otlp_port: u16,
) -> String {
    let yaml = envoy_config(listener, valet, upstream, admin);
    let anchor = "                stat_prefix: ingress_http\n";
    assert_eq!(yaml.matches(anchor).count(), 1);
    let tracing = r#"                tracing:
                  random_sampling: { value: 100 }
                  provider:
                    name: envoy.tracers.opentelemetry
                    typed_config:
                      "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                      service_name: envoy
                      grpc_service:
                        envoy_grpc: { cluster_name: otel }
                        timeout: 1s
"#;
    let mut yaml = yaml.replace(anchor, &format!("{anchor}{tracing}"));
    yaml.push_str(&format!(
        r#"
    - name: otel
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: otel
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: 127.0.0.1, port_value: {otlp_port} }}

layered_runtime:
  layers:
    - name: static
      static_layer:
        tracing.opentelemetry.flush_interval_ms: 50
        tracing.opentelemetry.min_flush_spans: 1
"#
    ));
    yaml
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valets_span_is_a_child_of_envoys_ext_authz_span() {
    let started = Instant::now();
    let envoy_bin = envoy_path();
    let receiver = Receiver::start().await;
    let (up_addr, _seen) = common::http1::upstream().await;
    let config = format!(
        "{POLICY}tracing:\n  service_name: valet\n  sample_ratio: 0\n  otlp: {{ endpoint: \"{}\" }}\n",
        receiver.endpoint()
    );
    let valet = Valet::in_process(&config);
    let (listen_port, admin_port) = (free_port(), free_port());
    let yaml = traced_envoy_config(
        listen_port,
        valet.grpc.port(),
        up_addr.port(),
        admin_port,
        receiver.addr.port(),
    );
    let dir = tempdir().unwrap();
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, &yaml).unwrap();
    validate(&envoy_bin, &path);
    let envoy = start_ready(&envoy_bin, &path, dir.path(), listen_port).await;

    let bearer = format!("Bearer {}", rs256("orders:read"));
    let reply = request(listen_port, "/orders/7", &[("authorization", &bearer)])
        .await
        .unwrap();
    assert_eq!(reply.status, 200, "{reply:?}\n{}", valet.logs());

    // Valet's own sampling ratio is 0: its span exists only because Envoy's is sampled.
    let ours = receiver
        .wait_for(|s| s.service == "valet" && s.attr("valet.route").as_deref() == Some("orders"))
        .await
        .unwrap_or_else(|| panic!("no span from Valet: {:#?}", receiver.spans()));
    let parent = receiver
        .wait_for(|s| s.service == "envoy" && s.span_id() == ours.parent_span_id())
        .await
        .unwrap_or_else(|| {
            panic!(
                "Valet's parent {} is not one of Envoy's spans: {:#?}\nenvoy log:\n{}",
                ours.parent_span_id(),
                receiver.spans(),
                envoy.log()
            )
        });
    assert_eq!(parent.trace_id(), ours.trace_id());
    assert!(
        parent
            .span
            .name
            .contains("envoy.service.auth.v3.Authorization"),
        "Valet's parent is Envoy's ext_authz call: {:?}",
        parent.span.name
    );
    // Envoy's span of the request itself is in the same trace, above the ext_authz one.
    let request_span = receiver
        .wait_for(|s| s.service == "envoy" && s.span_id() == parent.parent_span_id())
        .await
        .expect("Envoy's span of the request");
    assert_eq!(request_span.trace_id(), ours.trace_id());
    assert_eq!(ours.attr("valet.decision").as_deref(), Some("allow"));
    drop(envoy);
    eprintln!("envoy tracing test: {:?}", started.elapsed());
}
