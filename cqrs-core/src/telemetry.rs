//! What the framework tells observers: `tracing` spans for each dispatch, append and handled
//! event, and metrics through the [`metrics`] facade (which has no recorder and no I/O of its
//! own: the application installs an exporter, for example `metrics-exporter-prometheus`).
//! With no subscriber and no recorder installed, both cost a cached check per call site.
//!
//! Install the recorder before building dispatchers and deciders and spawning handlers: each
//! registers its metrics once, when it is built, with the recorder installed then (so a
//! command or a handled event updates a handle and builds no metric key).
//!
//! # Spans
//!
//! | span | level | fields |
//! |---|---|---|
//! | `dispatch` | info | `category`, `stream`, `command_id`, `correlation_id`, `causation_id`, `attempts`, `outcome` |
//! | `append` | info | `store`, `stream`, `events`, `result` (the caller's view of one append) |
//! | `append_batch` | debug | `store`, `appends`, `events` (one group commit of a SQL store's writer) |
//! | `handle` | info | `handler`, `position`, `event_type`, `stream`, `attempt`, `correlation_id`, `causation_id` |
//!
//! A `handle` span carries the correlation and causation ids of the event's command, so one
//! request can be followed from the dispatch, through the append, to every handler and any
//! process manager (whose commands are dispatched inside its `handle` span). With a
//! [`TraceContext`] installed ([`set_trace_context`]), the dispatcher also writes the current
//! trace context into the events' headers and the runner makes each `handle` span a child of
//! it: a connected trace across tasks and processes (the chat's `otel` feature does this with
//! OpenTelemetry).
//!
//! # Metrics
//!
//! | name | type | labels | what |
//! |---|---|---|---|
//! | `cqrs_commands_total` | counter | `category`, `outcome` | commands dispatched, by outcome: `stored`, `duplicate`, `no_events`, `rejected`, `invalid`, `too_many_conflicts`, `error` |
//! | `cqrs_command_conflicts_total` | counter | `category` | version conflicts retried (the command decided again) |
//! | `cqrs_dispatch_duration_seconds` | histogram | `category` | dispatch latency, routing to answer (without read-your-writes waits) |
//! | `cqrs_appends_total` | counter | `store`, `result` | appends by result: `appended`, `duplicate`, `conflict`, `error` |
//! | `cqrs_append_duration_seconds` | histogram | `store` | append latency as the caller sees it (queue + commit) |
//! | `cqrs_append_batch_size` | histogram | `store` | appends per group commit (SQL stores) |
//! | `cqrs_handler_position` | gauge | `handler` | position below which every event is handled |
//! | `cqrs_handler_lag_events` | gauge | `handler` | newest position the store announced, minus the handler's position |
//! | `cqrs_handler_events_total` | counter | `handler` | events handled |
//! | `cqrs_handler_failures_total` | counter | `handler` | failed attempts (retried or parked) |
//! | `cqrs_handler_parked_events` | gauge | `handler` | events parked, known to this runner |
//! | `cqrs_handler_active` | gauge | `handler` | 1 while this process is the active consumer, 0 while it stands by |
//! | `cqrs_handler_takeovers_total` | counter | `handler` | tenures this process started (an exclusive handler moved here) |

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Instant;

use crate::ids::StreamId;
use crate::store::{AppendOutcome, StoreError};

/// Carries a trace context through event headers, from the dispatch that stored an event to
/// the handlers that handle it. Install one with [`set_trace_context`]; without one, nothing
/// is written into headers.
pub trait TraceContext: Send + Sync + 'static {
    /// Writes the current span's context into the headers of the events being stored.
    fn inject(&self, headers: &mut HashMap<String, String>);
    /// Makes `span` (a `handle` span) a child of the context found in `headers`, if any.
    fn extract(&self, headers: &HashMap<String, String>, span: &tracing::Span);
}

static TRACE_CONTEXT: OnceLock<Box<dyn TraceContext>> = OnceLock::new();

/// Installs the process's trace-context propagation; false if one was installed already.
pub fn set_trace_context(propagation: impl TraceContext) -> bool {
    TRACE_CONTEXT.set(Box::new(propagation)).is_ok()
}

pub(crate) fn trace_context() -> Option<&'static dyn TraceContext> {
    TRACE_CONTEXT.get().map(|propagation| &**propagation)
}

/// Describes every framework metric (help text and unit) to the installed recorder, so an
/// exporter lists them with `# HELP` lines. Call it once after installing a recorder; a
/// recorder installed later misses the descriptions, not the metrics.
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!("cqrs_commands_total", "Commands dispatched, by aggregate category and outcome.");
    describe_counter!("cqrs_command_conflicts_total", "Version conflicts retried: the command was decided again.");
    describe_histogram!(
        "cqrs_dispatch_duration_seconds",
        Unit::Seconds,
        "Dispatch latency, routing to answer (without read-your-writes waits)."
    );
    describe_counter!("cqrs_appends_total", "Appends to the event store, by store and result.");
    describe_histogram!(
        "cqrs_append_duration_seconds",
        Unit::Seconds,
        "Append latency as the caller sees it (queue and commit)."
    );
    describe_histogram!("cqrs_append_batch_size", "Appends per group commit of a SQL store's writer.");
    describe_gauge!("cqrs_handler_position", "Position below which every event is handled, by handler.");
    describe_gauge!("cqrs_handler_lag_events", "Newest position the store announced minus the handler's position.");
    describe_counter!("cqrs_handler_events_total", "Events handled, by handler.");
    describe_counter!("cqrs_handler_failures_total", "Failed handler attempts (retried or parked).");
    describe_gauge!("cqrs_handler_parked_events", "Events parked, known to this runner.");
    describe_gauge!(
        "cqrs_handler_active",
        "1 while this process is the handler's active consumer, 0 while it stands by."
    );
    describe_counter!("cqrs_handler_takeovers_total", "Tenures this process started: an exclusive handler moved here.");
    describe_counter!(
        "cqrs_process_compensations_refused_total",
        "Compensations a process manager decided for a refused command that were refused too (the event failed)."
    );
    describe_counter!(
        "cqrs_process_schedules_set_aside_total",
        "Scheduled commands a process manager's scheduler set aside (unreadable, or failing too often)."
    );
    describe_counter!(
        "cqrs_subscription_skipped_events_total",
        "Events found at positions a subscription had already passed: skipped. Nonzero is a store bug."
    );
}

/// For store implementors: the `append` span of one append, to enter around it.
pub fn append_span(store: &'static str, stream: &StreamId, events: usize) -> tracing::Span {
    tracing::info_span!(
        "append",
        store,
        stream = %stream,
        events,
        result = tracing::field::Empty,
    )
}

/// For store implementors: records an append's result on its span and in the metrics.
pub fn record_append(
    store: &'static str,
    started: Instant,
    result: &Result<AppendOutcome, StoreError>,
    span: &tracing::Span,
) {
    let outcome = match result {
        Ok(AppendOutcome::Appended(_)) => "appended",
        Ok(AppendOutcome::Duplicate(_)) => "duplicate",
        Err(StoreError::Conflict { .. }) => "conflict",
        Err(_) => "error",
    };
    span.record("result", outcome);
    let elapsed = started.elapsed().as_secs_f64();
    // The bundled stores' keys are literals, so the macros make them static: no key is built
    // per append. Another store's name builds its key each time.
    macro_rules! known {
        ($store:literal) => {{
            match outcome {
                "appended" => metrics::counter!("cqrs_appends_total", "store" => $store, "result" => "appended"),
                "duplicate" => metrics::counter!("cqrs_appends_total", "store" => $store, "result" => "duplicate"),
                "conflict" => metrics::counter!("cqrs_appends_total", "store" => $store, "result" => "conflict"),
                _ => metrics::counter!("cqrs_appends_total", "store" => $store, "result" => "error"),
            }
            .increment(1);
            metrics::histogram!("cqrs_append_duration_seconds", "store" => $store).record(elapsed);
        }};
    }
    match store {
        "memory" => known!("memory"),
        "sqlite" => known!("sqlite"),
        "postgres" => known!("postgres"),
        _ => {
            metrics::counter!("cqrs_appends_total", "store" => store, "result" => outcome).increment(1);
            metrics::histogram!("cqrs_append_duration_seconds", "store" => store).record(elapsed);
        }
    }
}

/// For store implementors: records the size of one group commit.
pub fn record_batch(store: &'static str, appends: usize) {
    let appends = appends as f64;
    match store {
        "sqlite" => metrics::histogram!("cqrs_append_batch_size", "store" => "sqlite").record(appends),
        "postgres" => metrics::histogram!("cqrs_append_batch_size", "store" => "postgres").record(appends),
        _ => metrics::histogram!("cqrs_append_batch_size", "store" => store).record(appends),
    }
}
