//! The admin page: every handler's parked events, with retry and discard forms.

use maud::{html, Markup, DOCTYPE};

use super::assets::Assets;
use super::format::utc;

/// `/admin/parked`: every handler's parked events, with retry and discard forms (plain HTML
/// forms: no script). Each event is a row `tr[data-parked=POSITION][data-status]` inside
/// `section[data-handler=NAME]`.
pub fn parked_page(assets: &Assets, handlers: &[(String, Vec<cqrs_core::ParkedEvent>)]) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { "Parked events · Live chat" }
                link rel="stylesheet" href=(assets.style);
            }
            body data-view="admin" {
                header.top { a.brand href="/" { "Live chat" } a href="/dashboard" { "Dashboard" } }
                main.dashboard {
                    h1 { "Parked events" }
                    p {
                        "An event a handler failed on too often is parked: kept with its error while the handler "
                        "goes on (later events of the same room wait behind it, in order). Retry asks the running "
                        "handler for another attempt; discard drops it for good."
                    }
                    @for (handler, events) in handlers {
                        section data-handler=(handler) data-count=(events.len()) {
                            h2 { (handler) " · " (events.len()) " parked" }
                            @if events.is_empty() {
                                p { "None." }
                            } @else {
                                form method="post" action="/admin/parked/retry" {
                                    input type="hidden" name="handler" value=(handler);
                                    input type="hidden" name="all" value="1";
                                    button type="submit" { "Retry all" }
                                }
                                table.parked {
                                    thead { tr { th { "Position" } th { "Room" } th { "Event" } th { "Attempts" } th { "Error" } th { "Parked at (UTC)" } th { "Status" } th {} } }
                                    tbody {
                                        @for event in events {
                                            @let (day, time) = utc(event.parked_at.0);
                                            tr data-parked=(event.position.0) data-status=(event.status.as_str()) {
                                                td { (event.position.0) }
                                                td { (event.stream_id) }
                                                td { (event.event_type) }
                                                td { (event.attempts) }
                                                td { (event.error) }
                                                td { (day) " " (time) }
                                                td { (event.status.as_str()) }
                                                td {
                                                    form method="post" action="/admin/parked/retry" {
                                                        input type="hidden" name="handler" value=(handler);
                                                        input type="hidden" name="position" value=(event.position.0);
                                                        button type="submit" { "Retry" }
                                                    }
                                                    form method="post" action="/admin/parked/discard" {
                                                        input type="hidden" name="handler" value=(handler);
                                                        input type="hidden" name="position" value=(event.position.0);
                                                        button type="submit" { "Discard" }
                                                    }
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
