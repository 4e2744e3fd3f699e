//! The event log: by position, by stream and by category; one event with its metadata; and a
//! correlation id followed through every event it caused.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use cqrs_core::{EventId, Position, RecordedEvent, StreamId, Version};
use maud::{html, Markup};
use serde::Deserialize;

use super::processes::compact_text;
use crate::access::Base;
use crate::error::ConsoleError;
use crate::{layout, Console};

/// Events per page.
const PAGE: usize = 50;
/// Events read per store call while scanning (a category, a correlation).
const SCAN_PAGE: usize = 1_000;
/// Most events a category page scans before it stops (the next page goes on from there).
const CATEGORY_SCAN: usize = 50_000;
/// Most events a correlation scan reads, from the log's start.
const CORRELATION_SCAN: usize = 1_000_000;

/// Where to browse.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Browse {
    after: Option<String>,
    stream: Option<String>,
    category: Option<String>,
}

fn number(text: Option<&str>, what: &str) -> Result<u64, ConsoleError> {
    match text.map(str::trim).filter(|text| !text.is_empty()) {
        None => Ok(0),
        Some(text) => {
            text.parse().map_err(|_| ConsoleError::BadRequest(format!("{what} {text:?} is not a whole number")))
        }
    }
}

/// `GET /streams` (`?after=P`, `?stream=ID&after=V`, `?category=C&after=P`).
pub(crate) async fn browse(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Query(browse): Query<Browse>,
) -> Result<Response, ConsoleError> {
    let after = number(browse.after.as_deref(), "after")?;
    let stream = browse.stream.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let category = browse.category.as_deref().map(str::trim).filter(|s| !s.is_empty());
    let (events, next, heading) = if let Some(stream) = stream {
        let id = StreamId::new(stream).map_err(|error| ConsoleError::BadRequest(error.to_string()))?;
        let events = console.store.read_stream(&id, Version(after + 1), PAGE).await?;
        let next = (events.len() == PAGE).then(|| format!("stream={stream}&after={}", events[PAGE - 1].version.0));
        (events, next, format!("Stream {stream}"))
    } else if let Some(category) = category {
        let (events, scanned_to) = scan_category(&console, category, Position(after)).await?;
        let next = scanned_to.map(|to| format!("category={category}&after={}", to.0));
        (events, next, format!("Category {category}"))
    } else {
        let events = console.store.read_all(Position(after), PAGE).await?;
        let next = (events.len() == PAGE).then(|| format!("after={}", events[PAGE - 1].position.0));
        (events, next, "The log".to_owned())
    };
    let body = html! {
        h1 { (heading) }
        form #browse method="get" action={ (base) "/streams" } {
            label { "Stream " input name="stream" value=[stream]; } " "
            label { "Category " input name="category" value=[category]; } " "
            label { "After " input type="number" min="0" name="after" value=(after) size="8"; } " "
            button type="submit" { "Show" }
        }
        (event_table(&base, &events))
        @if let Some(next) = next { p { a #next href={ (base) "/streams?" (next) } { "Next page" } } }
    };
    Ok(layout::page("Streams", &base, "streams", std::time::Duration::ZERO, body).into_response())
}

/// Up to a page of `category`'s events after `after`, scanning at most [`CATEGORY_SCAN`]
/// events; with where to go on from, if there may be more.
async fn scan_category(
    console: &Console,
    category: &str,
    mut after: Position,
) -> Result<(Vec<RecordedEvent>, Option<Position>), ConsoleError> {
    let mut found = Vec::new();
    let mut scanned = 0;
    loop {
        let page = console.store.read_all(after, SCAN_PAGE).await?;
        let full = page.len() == SCAN_PAGE;
        for event in page {
            after = event.position;
            scanned += 1;
            if event.category() == category {
                found.push(event);
                if found.len() == PAGE {
                    return Ok((found, Some(after)));
                }
            }
        }
        if !full {
            return Ok((found, None));
        }
        if scanned >= CATEGORY_SCAN {
            return Ok((found, Some(after)));
        }
    }
}

fn event_table(base: &str, events: &[RecordedEvent]) -> Markup {
    html! {
        table #events {
            thead { tr { th { "Position" } th { "Stream" } th { "Version" } th { "Type" } th { "Recorded" } th { "Payload" } } }
            tbody { @for event in events {
                tr data-position=(event.position.0) data-stream=(event.stream_id) data-type=(event.event_type) {
                    td { a href={ (base) "/events/" (event.position.0) } { (event.position) } }
                    td { a href={ (base) "/streams?stream=" (event.stream_id) } { (event.stream_id) } }
                    td.num { (event.version.0) }
                    td { (event.event_type) }
                    td { (event.recorded_at) }
                    td { code { (compact_text(&event.payload.json())) } }
                }
            } }
        }
    }
}

/// `GET /events/{position}`.
pub(crate) async fn event(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Path(position): Path<String>,
) -> Result<Response, ConsoleError> {
    let position = number(Some(&position), "position")?;
    let found = console.store.read_all(Position(position.saturating_sub(1)), 1).await?;
    let Some(event) = found.into_iter().next().filter(|event| event.position.0 == position && position > 0) else {
        return Err(ConsoleError::NotFound("no event at that position"));
    };
    let metadata = &event.metadata;
    // A payload that is not JSON (a damaged row) is shown as stored.
    let payload = match event.payload.value() {
        Ok(value) => serde_json::to_string_pretty(value).unwrap_or_default(),
        Err(_) => event.payload.json().into_owned(),
    };
    let body = html! {
        h1 { "Event " (event.position) }
        table #event {
            tr { th { "Stream" } td { a href={ (base) "/streams?stream=" (event.stream_id) } { (event.stream_id) } " version " (event.version.0) } }
            tr { th { "Type" } td { (event.event_type) " (schema " (event.schema_version) ")" } }
            tr { th { "Event id" } td #event-id { (event.event_id) } }
            tr { th { "Recorded" } td { (event.recorded_at) } }
            tr { th { "Command" } td { @if let Some(id) = metadata.command_id { (id) } @else { "—" } } }
            tr { th { "Caused by" } td #causation { @if let Some(id) = metadata.causation_id { (id) } @else { "a command from outside" } } }
            tr { th { "Correlation" } td #correlation {
                @if let Some(id) = metadata.correlation_id { a href={ (base) "/correlations/" (id) } { (id) } " (follow it)" } @else { "—" }
            } }
            tr { th { "Tags" } td { @for tag in event.tags.iter() { code { (tag.as_str()) } " " } } }
            @for (name, value) in &metadata.headers { tr { th { "Header " (name) } td { (value) } } }
        }
        h2 { "Payload" }
        pre #payload { (payload) }
    };
    Ok(layout::page(&format!("Event {position}"), &base, "streams", std::time::Duration::ZERO, body).into_response())
}

/// `GET /correlations/{id}`: every event of the conversation, as a tree of causes.
pub(crate) async fn correlation(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Path(id): Path<String>,
) -> Result<Response, ConsoleError> {
    let mut events = Vec::new();
    let mut after = Position::START;
    let mut scanned = 0usize;
    let complete = loop {
        let page = console.store.read_all(after, SCAN_PAGE).await?;
        let full = page.len() == SCAN_PAGE;
        for event in page {
            after = event.position;
            scanned += 1;
            if event.metadata.correlation_id.is_some_and(|c| c.to_string() == id) {
                events.push(event);
            }
        }
        if !full {
            break true;
        }
        if scanned >= CORRELATION_SCAN {
            break false;
        }
    };
    let depth = depths(&events);
    let body = html! {
        h1 { "Correlation " (id) }
        p.muted {
            (events.len()) " event(s), indented under the event that caused them. "
            @if !complete { "Only the first " (CORRELATION_SCAN) " events of the log were scanned." }
        }
        table #chain {
            thead { tr { th { "Event" } th { "Stream" } th { "Type" } th { "Recorded" } } }
            tbody { @for event in &events {
                @let level = depth.get(&event.event_id).copied().unwrap_or(0);
                tr data-position=(event.position.0) data-depth=(level) {
                    td class={ "d" (level.min(layout::MAX_DEPTH)) } {
                        a href={ (base) "/events/" (event.position.0) } { (event.position) }
                    }
                    td { (event.stream_id) } td { (event.event_type) } td { (event.recorded_at) }
                }
            } }
        }
    };
    Ok(layout::page(&format!("Correlation {id}"), &base, "streams", std::time::Duration::ZERO, body).into_response())
}

/// How deep each event is in its chain of causes (0: caused by a command from outside, or by
/// an event not in the list).
fn depths(events: &[RecordedEvent]) -> HashMap<EventId, usize> {
    let mut depth: HashMap<EventId, usize> = HashMap::with_capacity(events.len());
    for event in events {
        let parent = event.metadata.causation_id.and_then(|cause| depth.get(&EventId(cause.0)).copied());
        depth.insert(event.event_id, parent.map_or(0, |d| d + 1));
    }
    depth
}
