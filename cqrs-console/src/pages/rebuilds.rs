//! Rebuilds: each rebuildable projection's live version and the one beside it, with the
//! actions that build, switch and drop versions ([`cqrs_core::rebuild`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Form, Path, Query, State};
use axum::response::{IntoResponse, Response};
use cqrs_core::rebuild::{version_name, Rebuilds};
use cqrs_core::Position;
use maud::html;
use serde::Deserialize;

use super::{back, Live};
use crate::access::{Base, Operator};
use crate::error::ConsoleError;
use crate::{layout, Console};

/// How long a switch waits for the new version to reach the live one.
const SWITCH_WAIT: Duration = Duration::from_secs(30);

fn rebuilds(console: &Console) -> Result<&Rebuilds, ConsoleError> {
    console.config.rebuilds.as_ref().ok_or(ConsoleError::NotFound("no rebuildable projection is configured"))
}

/// `GET /rebuilds`.
pub(crate) async fn list(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Query(live): Query<Live>,
) -> Result<Response, ConsoleError> {
    let views = match &console.config.rebuilds {
        Some(rebuilds) => rebuilds.views().await,
        None => Vec::new(),
    };
    let head = console.store.head().await?;
    let body = html! {
        h1 { "Rebuilds" }
        p.muted {
            "A new version is built from the origin into its own tables while the live one serves. "
            "Switching waits until it has reached the live one; the old version is kept current for a rollback until dropped. "
            "No other handler runs again: side effects are not repeated."
        }
        @if views.is_empty() { p { "No rebuildable projection is configured (ConsoleConfig::with_rebuilds)." } }
        table #rebuilds {
            thead { tr { th { "Projection" } th { "Version" } th { "Role" } th { "State here" } th { "Position" } th { "Behind head" } th { "Events/s" } th { "Actions" } } }
            tbody { @for view in &views {
                @for version in std::iter::once(view.live).chain(view.beside) {
                    @let status = view.status(version);
                    @let position = status.map_or(Position::START, |s| s.position);
                    @let role = if version == view.live { "live" } else if version > view.live { "building" } else { "kept" };
                    tr data-projection=(view.name) data-version=(version) data-role=(role) data-position=(position.0) data-live=(view.live) {
                        td { (view.name) }
                        td { "v" (version) }
                        td { (role) }
                        td { @if let Some(status) = status { (status.state) } @else { "—" } }
                        td.num { (position) }
                        td.num { (head.0.saturating_sub(position.0)) }
                        td.num { (format!("{:.0}", console.rate(&version_name(&view.name, version), position))) }
                        td {
                            @if version != view.live {
                                form.inline.switch method="post" action={ (base) "/rebuilds/" (view.name) "/switch" } {
                                    input type="hidden" name="version" value=(version);
                                    button type="submit" { "Switch to v" (version) }
                                }
                                " "
                                form.inline.drop method="post" action={ (base) "/rebuilds/" (view.name) "/drop" } {
                                    input type="hidden" name="version" value=(version);
                                    button type="submit" { "Drop v" (version) }
                                }
                            } @else if view.beside.is_none() {
                                form.inline.build method="post" action={ (base) "/rebuilds/" (view.name) "/build" } {
                                    button type="submit" { "Build a new version beside" }
                                }
                            }
                        }
                    }
                }
            } }
        }
    };
    let refresh = live.refresh(console.config.refresh);
    Ok(layout::page(&format!("{}: rebuilds", console.config.title), &base, "rebuilds", refresh, body).into_response())
}

/// `POST /rebuilds/{name}/build`.
pub(crate) async fn build(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
) -> Result<Response, ConsoleError> {
    let version = rebuilds(&console)?.build(&name).await?;
    tracing::warn!(projection = %name, version, %operator, "rebuild started from the console");
    Ok(back(&base, "/rebuilds").into_response())
}

/// The version a switch or drop acts on.
#[derive(Debug, Deserialize)]
pub(crate) struct VersionForm {
    version: String,
}

impl VersionForm {
    fn version(&self) -> Result<u32, ConsoleError> {
        self.version
            .trim()
            .parse()
            .map_err(|_| ConsoleError::BadRequest(format!("{:?} is not a version number", self.version)))
    }
}

/// `POST /rebuilds/{name}/switch` (`version`).
pub(crate) async fn switch(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
    Form(form): Form<VersionForm>,
) -> Result<Response, ConsoleError> {
    let version = form.version()?;
    rebuilds(&console)?.switch(&name, version, SWITCH_WAIT).await?;
    tracing::warn!(projection = %name, version, %operator, "switched from the console");
    Ok(back(&base, "/rebuilds").into_response())
}

/// `POST /rebuilds/{name}/drop` (`version`).
pub(crate) async fn drop_version(
    State(console): State<Arc<Console>>,
    Base(base): Base,
    Operator(operator): Operator,
    Path(name): Path<String>,
    Form(form): Form<VersionForm>,
) -> Result<Response, ConsoleError> {
    let version = form.version()?;
    rebuilds(&console)?.drop_version(&name, version).await?;
    tracing::warn!(projection = %name, version, %operator, "version dropped from the console");
    Ok(back(&base, "/rebuilds").into_response())
}
