//! The `otel` feature: one message sent over the websocket makes one connected trace, from the
//! chat's command span through the framework's dispatch and append to the read model's
//! projection (`handle`), linked across tasks by the `traceparent` header of the stored event.

#[allow(dead_code)]
#[path = "it/support.rs"]
mod support;

use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry::Value;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use uuid::Uuid;

use support::{TestServer, TIMEOUT};

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes.iter().find(|kv| kv.key.as_str() == key).map(|kv| &kv.value)
}

/// The finished spans, once `done` holds for them (spans end, and are exported, as their tasks
/// finish: the projection's may end after the viewer saw the message).
async fn spans_until(exporter: &InMemorySpanExporter, done: impl Fn(&[SpanData]) -> bool) -> Vec<SpanData> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let spans = exporter.get_finished_spans().expect("exporter readable");
        if done(&spans) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans never completed: {:#?}",
            spans.iter().map(|s| &s.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_message_makes_one_connected_trace_from_send_to_projection() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
    tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(livechat_app::otel::layer(&provider))
        .init();
    assert!(livechat_app::otel::install_propagation());

    let server = TestServer::start().await;
    let (mut alice, _) = server.join("alice", "traced", 0).await;
    let id = Uuid::new_v4();
    alice.send_message(1, id, "follow me").await;
    alice.recv_kind("msg").await;

    let handler = livechat_app::rooms::HANDLER_NAME;
    let is_projection =
        |s: &SpanData| s.name == "handle" && attribute(s, "handler").is_some_and(|h| h.as_str() == handler);
    let spans = spans_until(&exporter, |spans| {
        spans.iter().any(|s| s.name == "chat_command") && spans.iter().any(is_projection)
    })
    .await;
    let command = spans
        .iter()
        .find(|s| s.name == "chat_command" && attribute(s, "command_id").is_some_and(|v| v.as_str() == id.to_string()))
        .expect("the chat's command span");
    assert_eq!(attribute(command, "outcome").map(Value::as_str).as_deref(), Some("stored"));
    let trace: TraceId = command.span_context.trace_id();
    let in_trace: Vec<&SpanData> = spans.iter().filter(|s| s.span_context.trace_id() == trace).collect();
    let child_of =
        |name: &str, parent: SpanId| in_trace.iter().find(|s| s.name == name && s.parent_span_id == parent).copied();
    let dispatch = child_of("dispatch", command.span_context.span_id()).expect("dispatch is a child of the command");
    assert_eq!(attribute(dispatch, "outcome").map(Value::as_str).as_deref(), Some("stored"));
    let append = child_of("append", dispatch.span_context.span_id()).expect("append is a child of the dispatch");
    assert_eq!(attribute(append, "result").map(Value::as_str).as_deref(), Some("appended"));
    let projection = in_trace
        .iter()
        .find(|s| is_projection(s))
        .expect("the read model's handle span is in the same trace (through the event's headers)");
    assert_eq!(projection.parent_span_id, dispatch.span_context.span_id(), "handle continues the dispatch");
    assert_eq!(attribute(projection, "event_type").map(Value::as_str).as_deref(), Some("MessageSent"));

    server.stop().await;
    provider.shutdown().expect("provider shuts down");
}
