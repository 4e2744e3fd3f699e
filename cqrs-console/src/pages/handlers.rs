//! Handlers and process managers: where each runs, how far it is, what it is doing, and the
//! operator's actions (pause, resume, reset with a confirmation, parked events).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Form, Path, Query, State};
use axum::response::{IntoResponse, Response};
use cqrs_core::handler::control::{is_reserved, paused_in, standbys_in, PAUSE_PREFIX};
use cqrs_core::{HandlerState, HandlerStatus, Position};
use maud::html;
use serde::Deserialize;

use super::{back, Live};
use crate::access::{Base, Operator};
use crate::error::ConsoleError;
use crate::{layout, Console};

/// A handler's position at an instant, for its rate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    at: Instant,
    position: u64,
    rate: f64,
}

/// One row of the handlers table.
#[derive(Debug)]
struct Row {
    name: String,
    /// This process's runner, if it has one.
    status: Option<HandlerStatus>,
    /// Who holds the claim (the active process of an exclusive handler).
    holder: Option<String>,
    paused_by: Option<String>,
    /// How far it is: here if it runs here, else its saved checkpoint; `None` for a task with no
    /// checkpoint (a process manager's scheduler).
    position: Option<Position>,
    /// The processes standing by for it (their announcements in the claims).
    standbys: Vec<String>,
    parked: usize,
}

impl Row {
    fn state(&self) -> String {
        match (&self.status, &self.paused_by) {
            (_, Some(by)) => HandlerState::Paused { by: by.clone() }.to_string(),
            (Some(status), None) => status.state.to_string(),
            (None, None) if self.holder.is_some() => "running elsewhere".to_owned(),
            (None, None) => "not running here".to_owned(),
        }
    }

    fn placement(&self) -> &'static str {
        match self.status.as_ref().map(|status| status.placement) {
            Some(cqrs_core::Placement::EveryProcess) => "every process",
            Some(_) | None => "exclusive",
        }
    }

    /// Whether this is the standby here (another process holds it).
    fn standby_here(&self) -> bool {
        self.status.as_ref().is_some_and(|status| matches!(status.state, HandlerState::Standby { .. }))
    }
}

impl Console {
    /// Every handler known here or holding a claim in the store, with its figures.
    async fn rows(&self) -> Result<Vec<Row>, ConsoleError> {
        let local: BTreeMap<String, HandlerStatus> =
            self.progress.statuses().into_iter().map(|status| (status.name.clone(), status)).collect();
        let claims = self.store.claims().await?;
        // One read of the claims for the holders, the pauses and the standbys.
        let paused: BTreeMap<String, String> = paused_in(&claims).into_iter().collect();
        let mut standbys: BTreeMap<String, Vec<String>> = standbys_in(&claims).into_iter().collect();
        let holders: BTreeMap<String, String> = claims
            .into_iter()
            .filter(|claim| !is_reserved(&claim.name) && !claim.owner.starts_with(PAUSE_PREFIX))
            .map(|claim| (claim.name, claim.owner))
            .collect();
        let names: BTreeSet<String> =
            local.keys().chain(holders.keys()).chain(paused.keys()).chain(standbys.keys()).cloned().collect();
        let mut rows = Vec::with_capacity(names.len());
        for name in names {
            let status = local.get(&name).cloned();
            let here = status.as_ref().filter(|status| status.is_active()).map(|status| status.position);
            let position = match here {
                Some(position) => Some(position),
                None => self.store.load_checkpoint(&name).await?,
            };
            let parked = self.store.parked(&name).await?.len();
            rows.push(Row {
                holder: holders.get(&name).cloned(),
                paused_by: paused.get(&name).cloned(),
                standbys: standbys.remove(&name).unwrap_or_default(),
                name,
                status,
                position,
                parked,
            });
        }
        Ok(rows)
    }

    /// Refuses a handler this console does not know (not running here, holding no claim, not
    /// paused, no checkpoint): an action on a mistyped name must change nothing.
    async fn known(&self, name: &str) -> Result<(), ConsoleError> {
        let rows = self.rows().await?;
        if rows.iter().any(|row| row.name == name) || self.store.load_checkpoint(name).await?.is_some() {
            return Ok(());
        }
        Err(ConsoleError::NotFound("no such handler: none runs here, holds a claim or has a checkpoint"))
    }

    /// Events per second of `name` since the last look (positions are gap-free, so a
    /// position's advance is the events handled or passed over).
    pub(crate) fn rate(&self, name: &str, position: Position) -> f64 {
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let sample = samples.entry(name.to_owned()).or_insert(Sample { at: now, position: position.0, rate: 0.0 });
        let elapsed = now.duration_since(sample.at).as_secs_f64();
        if elapsed >= 1.0 {
            sample.rate = position.0.saturating_sub(sample.position) as f64 / elapsed;
            sample.at = now;
            sample.position = position.0;
        }
        sample.rate
    }
}

/// `GET /handlers`.
pub(crate) async fn list(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Query(live): Query<Live>,
) -> Result<Response, ConsoleError> {
    let rows = console.rows().await?;
    let head = console.store.head().await?;
    let refresh = live.refresh(console.config.refresh);
    let body = html! {
        h1 { "Handlers" }
        p.muted { "Head of the log: " span #head { (head) } ". A pause reaches every process within a third of the claim's ttl." }
        table #handlers {
            thead { tr {
                th { "Handler" } th { "Placement" } th { "Active process" } th { "Standbys" } th { "Here" } th { "State" }
                th { "Position" } th { "Lag" } th { "Events/s" } th { "Parked" } th { "Actions" }
            } }
            tbody {
                @for row in &rows {
                    @let lag = row.position.map(|position| head.0.saturating_sub(position.0));
                    @let state = row.state();
                    tr data-handler=(row.name) data-state=(state) data-position=(row.position.map(|p| p.0.to_string()).unwrap_or_default())
                        data-lag=(lag.map(|lag| lag.to_string()).unwrap_or_default())
                        data-holder=(row.holder.as_deref().unwrap_or("")) data-parked=(row.parked)
                        data-standbys=(row.standbys.join(" ")) {
                        td { (row.name) }
                        td { (row.placement()) }
                        td { (row.holder.as_deref().unwrap_or("—")) }
                        td { @if row.standbys.is_empty() { "—" } @else { (row.standbys.join(", ")) } }
                        td { @if row.standby_here() { "standby" } @else if row.status.as_ref().is_some_and(HandlerStatus::is_active) { "active" } @else if row.status.is_some() { "—" } @else { "no runner" } }
                        td.state { (state) }
                        td.num { @if let Some(position) = row.position { (position) } @else { "—" } }
                        td.num { @if let Some(lag) = lag { (lag) } @else { "—" } }
                        td.num { @if let Some(position) = row.position { (format!("{:.0}", console.rate(&row.name, position))) } @else { "—" } }
                        td.num { @if row.parked > 0 { a href={ (base) "/handlers/" (row.name) "/parked" } { (row.parked) } } @else { "0" } }
                        td {
                            @if row.paused_by.is_some() {
                                form.inline.resume method="post" action={ (base) "/handlers/" (row.name) "/resume" } { button type="submit" { "Resume" } }
                            } @else if row.placement() == "exclusive" {
                                form.inline.pause method="post" action={ (base) "/handlers/" (row.name) "/pause" } { button type="submit" { "Pause" } }
                            }
                            " "
                            @if let (Some(position), "exclusive") = (row.position, row.placement()) {
                                form.inline.reset method="get" action={ (base) "/handlers/" (row.name) "/reset" } {
                                    input type="number" name="to" min="0" value=(position.0) size="8" aria-label="reset to position";
                                    button type="submit" { "Reset…" }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    Ok(layout::page(&format!("{}: handlers", console.config.title), &base, "handlers", refresh, body).into_response())
}

/// `POST /handlers/{name}/pause`.
pub(crate) async fn pause(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    console.known(&name).await?;
    console.control.pause(&name, &operator).await?;
    tracing::warn!(handler = %name, %operator, "handler paused from the console");
    Ok(back(&base, "/handlers").into_response())
}

/// `POST /handlers/{name}/resume`.
pub(crate) async fn resume(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    if !console.control.resume(&name).await? {
        return Err(ConsoleError::NotFound("that handler is not paused"));
    }
    tracing::warn!(handler = %name, %operator, "handler resumed from the console");
    Ok(back(&base, "/handlers").into_response())
}

/// The position a reset moves to.
#[derive(Debug, Deserialize)]
pub(crate) struct ResetTo {
    to: String,
    confirm: Option<String>,
}

impl ResetTo {
    fn position(&self) -> Result<Position, ConsoleError> {
        super::position(&self.to)
    }
}

/// `GET /handlers/{name}/reset?to=P`: what a reset to `P` would do, and the form to confirm it.
pub(crate) async fn confirm_reset(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Path(name): Path<String>,
    Query(reset): Query<ResetTo>,
) -> Result<Response, ConsoleError> {
    let to = reset.position()?;
    let head = console.store.head().await?;
    let now = console.store.load_checkpoint(&name).await?.unwrap_or(Position::START);
    let body = html! {
        h1 { "Reset " (name) "?" }
        @if to <= now {
            p #reset-effect data-again=(head.0.saturating_sub(to.0)) {
                "Its checkpoint moves from " (now) " back to " (to) ". Once resumed, it handles again every event after "
                (to) ": " strong { (head.0.saturating_sub(to.0)) " events" } " up to the head (" (head) ") as it is now, and those stored meanwhile."
            }
            p.error { "If " (name) " has side effects (mail, payments, calls to other services), they happen again for those events. A projection must apply them idempotently." }
        } @else {
            p #reset-effect data-skipped=(to.0.min(head.0).saturating_sub(now.0)) {
                "Its checkpoint moves forward from " (now) " to " (to) ": the "
                strong { (to.0.min(head.0).saturating_sub(now.0)) " events" } " after " (now) " up to " (to) " are passed over, never handled."
            }
        }
        p.muted { "The handler is paused while its checkpoint moves (in every process), then resumed if it was running." }
        form #confirm-reset method="post" action={ (base) "/handlers/" (name) "/reset" } {
            input type="hidden" name="to" value=(to.0);
            input type="hidden" name="confirm" value="yes";
            button type="submit" { "Reset " (name) " to " (to) }
            " " a href={ (base) "/handlers" } { "Cancel" }
        }
    };
    Ok(layout::page(&format!("Reset {name}?"), &base, "handlers", std::time::Duration::ZERO, body).into_response())
}

/// `POST /handlers/{name}/reset` (`to`, `confirm=yes`): pauses the handler if it runs, moves
/// its checkpoint, and resumes it if it was running.
pub(crate) async fn reset(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
    Form(reset): Form<ResetTo>,
) -> Result<Response, ConsoleError> {
    let to = reset.position()?;
    if reset.confirm.as_deref() != Some("yes") {
        return Err(ConsoleError::BadRequest("a reset must be confirmed (confirm=yes)".to_owned()));
    }
    console.known(&name).await?;
    let was_paused = console.control.paused_by(&name).await?.is_some();
    if !was_paused {
        console.control.pause(&name, &format!("{operator} (reset)")).await?;
    }
    let outcome = console.control.reset(&name, to, console.config.reset_wait).await;
    if !was_paused {
        console.control.resume(&name).await?;
    }
    let before = outcome?;
    tracing::warn!(handler = %name, %operator, from = ?before, %to, "handler reset from the console");
    Ok(back(&base, "/handlers").into_response())
}

/// `GET /handlers/{name}/parked`.
pub(crate) async fn parked(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let parked = console.parked.list(&name).await?;
    let body = html! {
        h1 { "Parked events of " (name) }
        @if parked.is_empty() { p #no-parked { "None." } } @else {
            form.inline method="post" action={ (base) "/handlers/" (name) "/parked/retry" } {
                input type="hidden" name="all" value="1"; button type="submit" { "Retry all" }
            }
            table #parked {
                thead { tr { th { "Position" } th { "Stream" } th { "Type" } th { "Attempts" } th { "Status" } th { "Error" } th { "Actions" } } }
                tbody { @for event in &parked {
                    tr data-position=(event.position.0) data-parked=(event.position.0) data-status=(event.status.as_str()) {
                        td { a href={ (base) "/events/" (event.position.0) } { (event.position) } }
                        td { (event.stream_id) } td { (event.event_type) } td.num { (event.attempts) }
                        td { (event.status.as_str()) } td.error { (event.error) }
                        td {
                            form.inline method="post" action={ (base) "/handlers/" (name) "/parked/retry" } {
                                input type="hidden" name="position" value=(event.position.0); button type="submit" { "Retry" }
                            }
                            " "
                            form.inline method="post" action={ (base) "/handlers/" (name) "/parked/discard" } {
                                input type="hidden" name="position" value=(event.position.0); button type="submit" { "Discard" }
                            }
                        }
                    }
                } }
            }
        }
    };
    Ok(layout::page(&format!("Parked: {name}"), &base, "handlers", console.config.refresh, body).into_response())
}

/// A parked event (or all of them) to act on.
#[derive(Debug, Deserialize)]
pub(crate) struct ParkedForm {
    position: Option<String>,
    all: Option<String>,
}

impl ParkedForm {
    fn position(&self) -> Result<Position, ConsoleError> {
        super::position(self.position.as_deref().unwrap_or_default())
    }
}

/// `POST /handlers/{name}/parked/retry` (`position`, or `all=1`).
pub(crate) async fn retry_parked(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
    Form(form): Form<ParkedForm>,
) -> Result<Response, ConsoleError> {
    if form.all.as_deref() == Some("1") {
        let count = console.parked.retry_all(&name).await?;
        tracing::info!(handler = %name, %operator, count, "retry of every parked event requested");
    } else if !console.parked.retry(&name, form.position()?).await? {
        return Err(ConsoleError::NotFound("no such parked event"));
    }
    Ok(back(&base, &format!("/handlers/{name}/parked")).into_response())
}

/// `POST /handlers/{name}/parked/discard` (`position`).
pub(crate) async fn discard_parked(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
    Form(form): Form<ParkedForm>,
) -> Result<Response, ConsoleError> {
    let position = form.position()?;
    if !console.parked.discard(&name, position).await? {
        return Err(ConsoleError::NotFound("no such parked event"));
    }
    tracing::warn!(handler = %name, %operator, %position, "parked event discarded from the console");
    Ok(back(&base, &format!("/handlers/{name}/parked")).into_response())
}
