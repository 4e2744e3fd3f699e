//! Process managers: their live instances, pending schedules, and the scheduled commands set
//! aside after failing, with retry and discard.

use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::response::{IntoResponse, Response};
use cqrs_core::Timestamp;
use maud::html;
use serde::Deserialize;

use super::{back, Live};
use crate::access::{Base, Operator};
use crate::error::ConsoleError;
use crate::{layout, Console};

/// 9999-12-31 23:59:59 UTC.
const FAR_FUTURE: Timestamp = Timestamp(253_402_300_799_000_000);

/// Instances and schedules listed per process manager.
const MAX_LISTED: usize = 200;

/// `GET /processes`.
pub(crate) async fn list(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Query(live): Query<Live>,
) -> Result<Response, ConsoleError> {
    let mut sections = Vec::new();
    for process in &console.config.processes {
        let instances = console.processes.instances(process, None, MAX_LISTED).await?;
        // Every pending schedule: those due by the end of year 9999 (a store backed by
        // interval arithmetic may refuse the end of `i64`).
        let pending = console.store.due(process, FAR_FUTURE, MAX_LISTED).await?;
        let set_aside = console.processes.set_aside(process).await?;
        sections.push((process, instances, pending, set_aside));
    }
    let body = html! {
        h1 { "Process managers" }
        @if sections.is_empty() { p.muted { "No process manager is configured for this console (ConsoleConfig::with_processes)." } }
        @for (process, instances, pending, set_aside) in &sections {
            section data-process=(process) {
                h2 { (process) }
                h3 { "Instances (" (instances.len()) @if instances.len() == MAX_LISTED { "+" } ")" }
                table.instances {
                    thead { tr { th { "Key" } th { "State" } th { "Last event" } th { "Data" } } }
                    tbody { @for instance in instances {
                        tr data-key=(instance.key) {
                            td { (instance.key) }
                            td { @if instance.state.ended { "ended" } @else { "running" } }
                            td { a href={ (base) "/events/" (instance.state.position.0) } { (instance.state.position) } }
                            td { code { (compact(&instance.state.state)) } }
                        }
                    } }
                }
                h3 { "Pending schedules (" (pending.len()) ")" }
                table.pending {
                    thead { tr { th { "Key" } th { "Name" } th { "Due" } th { "Attempts" } th { "Command" } } }
                    tbody { @for scheduled in pending {
                        tr { td { (scheduled.key) } td { (scheduled.name) } td { (scheduled.due) } td.num { (scheduled.attempts) } td { code { (compact(&scheduled.command)) } } }
                    } }
                }
                h3 { "Set aside after failing (" (set_aside.len()) ")" }
                table.set-aside {
                    thead { tr { th { "Key" } th { "Name" } th { "Due" } th { "Error" } th { "Actions" } } }
                    tbody { @for command in set_aside {
                        tr data-key=(command.scheduled.key) data-name=(command.scheduled.name) {
                            td { (command.scheduled.key) } td { (command.scheduled.name) } td { (command.scheduled.due) }
                            td.error { (command.error) }
                            td {
                                form.inline method="post" action={ (base) "/processes/" (process) "/scheduled/retry" } {
                                    input type="hidden" name="key" value=(command.scheduled.key);
                                    input type="hidden" name="name" value=(command.scheduled.name);
                                    button type="submit" { "Retry" }
                                }
                                " "
                                form.inline method="post" action={ (base) "/processes/" (process) "/scheduled/discard" } {
                                    input type="hidden" name="key" value=(command.scheduled.key);
                                    input type="hidden" name="name" value=(command.scheduled.name);
                                    button type="submit" { "Discard" }
                                }
                            }
                        }
                    } }
                }
            }
        }
    };
    let refresh = live.refresh(console.config.refresh);
    Ok(layout::page(&format!("{}: processes", console.config.title), &base, "processes", refresh, body).into_response())
}

/// JSON on one line, cut at 300 characters.
pub(crate) fn compact(value: &serde_json::Value) -> String {
    compact_text(&value.to_string())
}

/// Text cut at 300 characters.
pub(crate) fn compact_text(text: &str) -> String {
    match text.char_indices().nth(300) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

/// A scheduled command, by its instance key and name.
#[derive(Debug, Deserialize)]
pub(crate) struct ScheduledForm {
    key: String,
    name: String,
}

/// `POST /processes/{process}/scheduled/retry`.
pub(crate) async fn retry(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(process): Path<String>,
    Form(form): Form<ScheduledForm>,
) -> Result<Response, ConsoleError> {
    if !console.processes.retry(&process, &form.key, &form.name).await? {
        return Err(ConsoleError::NotFound("no such set-aside command"));
    }
    tracing::info!(%process, key = %form.key, name = %form.name, %operator, "set-aside command retried from the console");
    Ok(back(&base, "/processes").into_response())
}

/// `POST /processes/{process}/scheduled/discard`.
pub(crate) async fn discard(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(process): Path<String>,
    Form(form): Form<ScheduledForm>,
) -> Result<Response, ConsoleError> {
    if !console.processes.discard(&process, &form.key, &form.name).await? {
        return Err(ConsoleError::NotFound("no such set-aside command"));
    }
    tracing::warn!(%process, key = %form.key, name = %form.name, %operator, "set-aside command discarded from the console");
    Ok(back(&base, "/processes").into_response())
}
