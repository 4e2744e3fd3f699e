//! The dashboard page and its live region: the numbers, the charts, the handlers.

use cqrs_core::HandlerState;
use maud::{html, Markup};

use super::assets::Assets;
use super::charts;
use super::format::micros;
use super::page::layout;
use crate::dashboard::{History, Snapshot};

/// `/dashboard`.
pub fn dashboard_page(assets: &Assets, metrics: &Markup) -> Markup {
    let content = html! {
        main.dashboard {
            h1 { "Dashboard" }
            div #metrics { (metrics) }
        }
    };
    layout(assets, "Dashboard · Live chat", "dashboard", None, content)
}

/// A handler's state as the dashboard lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerLine {
    /// The handler.
    pub name: String,
    /// Its state, in words.
    pub state: String,
    /// The position it reached.
    pub position: u64,
    /// Its events parked (known to this process's runner).
    pub parked: u64,
}

/// The dashboard's region: the numbers, the charts of the last 15 minutes, the handlers.
pub fn metrics(snapshot: &Snapshot, history: &History, handlers: &[HandlerLine]) -> Markup {
    let rows: [(&str, String); 12] = [
        ("Connected views", snapshot.views.to_string()),
        ("Rooms", snapshot.rooms.to_string()),
        ("Commands per second", format!("{:.1}", snapshot.commands_per_second)),
        ("Commands accepted / refused", format!("{} / {}", snapshot.commands_ok, snapshot.commands_refused)),
        ("Dispatch latency p50", micros(snapshot.dispatch_p50_micros)),
        ("Dispatch latency p99", micros(snapshot.dispatch_p99_micros)),
        ("Events stored", snapshot.store_head.to_string()),
        ("Events projected", snapshot.projected.to_string()),
        ("Projection lag (events)", snapshot.projection_lag.to_string()),
        ("Frames sent", snapshot.frames_sent.to_string()),
        ("Bytes sent", snapshot.bytes_sent.to_string()),
        ("Resyncs of lagging views", snapshot.resyncs.to_string()),
    ];
    html! {
        table {
            tbody {
                @for (name, value) in &rows {
                    tr { th scope="row" { (name) } td { (value) } }
                }
            }
        }
        section #charts aria-label="The last 15 minutes" {
            @for chart in charts::dashboard_charts(history) { (chart) }
        }
        table #handlers {
            thead { tr { th { "Handler" } th { "State" } th { "Position" } th { "Parked" } } }
            tbody {
                @for handler in handlers {
                    tr data-handler=(handler.name) data-parked=(handler.parked) {
                        td { (handler.name) } td { (handler.state) } td { (handler.position) }
                        td { @if handler.parked > 0 { a href={ "/admin/handlers/" (handler.name) "/parked" } { (handler.parked) } } @else { "0" } }
                    }
                }
            }
        }
        p { a href="/admin" { "Console" } ": pause, reset and rebuild handlers, parked events, the event log (this machine, or with the admin token)" }
    }
}

/// A handler's state in words (the dashboard's handler table and `/health`).
pub fn handler_state(state: &HandlerState) -> String {
    state.to_string()
}
