//! OpenTelemetry, behind the `otel` feature: the framework's and the chat's `tracing` spans
//! exported over OTLP/HTTP, and the W3C trace context carried in event headers, so the span of
//! a handler that handles an event (the read model's projection, a process manager) continues
//! the trace of the command that stored it, in this process or another.
//!
//! One sent message makes one trace: `chat_command` (the chat's command path) → `dispatch` →
//! `append`, and, through the `traceparent` header of the stored event, `handle` of every
//! handler, each a child of the `dispatch` span.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_opentelemetry::{OpenTelemetryLayer, OpenTelemetrySpanExt};

/// Carries the W3C trace context (`traceparent`, `tracestate`) through event headers; install
/// it with [`install_propagation`].
#[derive(Debug, Default)]
pub struct W3cTraceContext(TraceContextPropagator);

impl cqrs_core::telemetry::TraceContext for W3cTraceContext {
    fn inject(&self, headers: &mut HashMap<String, String>) {
        let context = tracing::Span::current().context();
        if context.span().span_context().is_valid() {
            self.0.inject_context(&context, headers);
        }
    }

    fn extract(&self, headers: &HashMap<String, String>, span: &tracing::Span) {
        let context = self.0.extract(headers);
        if context.span().span_context().is_valid() {
            // Fails only when the span is disabled or has no OpenTelemetry layer: nothing to link.
            let _ = span.set_parent(context);
        }
    }
}

/// Makes the framework carry trace context in event headers; false if a propagation was
/// installed already.
pub fn install_propagation() -> bool {
    cqrs_core::telemetry::set_trace_context(W3cTraceContext::default())
}

/// Why OTLP export could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the OTLP exporter: {0}")]
pub struct OtelError(#[from] opentelemetry_otlp::ExporterBuildError);

/// An OTLP/HTTP (protobuf) span exporter to `endpoint` (a collector's base URL, e.g.
/// `http://127.0.0.1:4318`; spans go to `/v1/traces`), batched, as a provider named
/// `livechat`. Keep the provider and call `shutdown` on it at exit to flush the last spans.
pub fn otlp_provider(endpoint: &str) -> Result<SdkTracerProvider, OtelError> {
    use opentelemetry_otlp::WithExportConfig;
    let endpoint = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().with_endpoint(endpoint).build()?;
    Ok(provider_with(exporter))
}

/// A provider exporting through `exporter` in batches, with this service's name.
pub fn provider_with(exporter: impl opentelemetry_sdk::trace::SpanExporter + 'static) -> SdkTracerProvider {
    let resource = opentelemetry_sdk::Resource::builder().with_service_name("livechat").build();
    SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build()
}

/// The `tracing` layer that turns spans into OpenTelemetry spans of `provider`.
pub fn layer<S>(provider: &SdkTracerProvider) -> OpenTelemetryLayer<S, SdkTracer>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("livechat"))
}
