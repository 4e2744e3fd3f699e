//! The run's report: a table for people, then one JSON line (`{"loadgen":…}`) for tools.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::args::Args;
use crate::stats::{percentile, FrameSizes, Tally};

/// Everything the report shows, gathered at the end of the run.
pub(crate) struct Report<'a> {
    pub(crate) args: &'a Args,
    pub(crate) room: &'a str,
    pub(crate) senders: usize,
    pub(crate) joined: usize,
    pub(crate) join_errors: BTreeMap<String, usize>,
    pub(crate) join_seconds: f64,
    pub(crate) sent: usize,
    pub(crate) send_seconds: f64,
    pub(crate) acked_ok: u64,
    pub(crate) acked_err: u64,
    pub(crate) ack_us: Vec<u32>,
    pub(crate) expected: u64,
    pub(crate) received: u64,
    pub(crate) lost: u64,
    pub(crate) duplicates: u64,
    pub(crate) unknown: u64,
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) thirds_p99: Vec<f64>,
    pub(crate) last_viewer_us: Vec<u32>,
    pub(crate) sizes: FrameSizes,
    pub(crate) catch_up: Tally,
    pub(crate) other: BTreeMap<String, Tally>,
    pub(crate) other_while_sending: Tally,
    pub(crate) rss_before: Option<u64>,
    pub(crate) rss_idle: Option<u64>,
    pub(crate) rss_end: Option<u64>,
    pub(crate) kib_per_view: Option<f64>,
    pub(crate) cpu_server: Option<f64>,
    pub(crate) server_us_per_frame: Option<f64>,
    pub(crate) cpu_self: Option<f64>,
    pub(crate) active_seconds: f64,
    pub(crate) cores: usize,
    pub(crate) machine_busy_cores: Option<f64>,
    pub(crate) other_cores: Option<f64>,
    pub(crate) pressure_before: Option<f64>,
    pub(crate) pressure_after: Option<f64>,
    pub(crate) ended: BTreeMap<String, usize>,
    pub(crate) signalled: Vec<String>,
    pub(crate) viewers_hit: usize,
    pub(crate) viewers_lossless: usize,
    pub(crate) reconnect_reasons: BTreeMap<String, usize>,
    pub(crate) recoveries_us: Vec<u64>,
    pub(crate) resets: u64,
    pub(crate) sender_reconnects: u64,
    pub(crate) resent: u64,
    pub(crate) refusals: BTreeMap<&'a str, usize>,
}

impl Report<'_> {
    /// The `p`th percentile of the times to recover after a reconnect, ms (NaN without one).
    fn recovery_ms(&self, p: f64) -> f64 {
        let recoveries_us = &self.recoveries_us;
        if recoveries_us.is_empty() {
            f64::NAN
        } else {
            let rank = ((p / 100.0) * recoveries_us.len() as f64).ceil().max(1.0) as usize;
            recoveries_us[rank.min(recoveries_us.len()) - 1] as f64 / 1_000.0
        }
    }

    /// Prints the table for people: the run and its deliveries, then the server and machine.
    pub(crate) fn print_table(&self) {
        let Report {
            args,
            senders,
            joined,
            join_seconds,
            sent,
            send_seconds,
            acked_ok,
            acked_err,
            ack_us,
            expected,
            received,
            lost,
            duplicates,
            unknown,
            p50,
            p99,
            max,
            thirds_p99,
            last_viewer_us,
            sizes,
            catch_up,
            other,
            other_while_sending,
            ..
        } = self;
        println!();
        println!("live fan-out: {joined} viewers, {senders} senders, {sent} messages in {send_seconds:.1} s");
        println!("{:<48} value", "what");
        row("viewers joined (of requested)", format!("{joined} of {}", args.viewers));
        row("join time, all viewers", format!("{join_seconds:.2} s"));
        row("messages sent / acked ok / refused", format!("{sent} / {acked_ok} / {acked_err}"));
        row(
            "ack round trip p50 / p99 (ms)",
            format!("{:.2} / {:.2}", percentile(ack_us, 50.0), percentile(ack_us, 99.0)),
        );
        row("deliveries expected / received", format!("{expected} / {received}"));
        row("deliveries lost / duplicated / unknown", format!("{lost} / {duplicates} / {unknown}"));
        row("delivery latency p50 / p99 / max (ms)", format!("{p50:.2} / {p99:.2} / {max:.2}"));
        row(
            "delivery p99 in 1st / 2nd / 3rd third (ms)",
            format!("{:.2} / {:.2} / {:.2}", thirds_p99[0], thirds_p99[1], thirds_p99[2]),
        );
        row(
            "last viewer has a message p50 / max (ms)",
            format!("{:.2} / {:.2}", percentile(last_viewer_us, 50.0), percentile(last_viewer_us, 100.0)),
        );
        if sizes.count > 0 {
            row("msg frame bytes min / max", format!("{} / {}", sizes.frame_min, sizes.frame_max));
            row("msg HTML bytes min / max", format!("{} / {}", sizes.html_min, sizes.html_max));
            row("msg frame - HTML bytes min / max", format!("{} / {}", sizes.overhead_min, sizes.overhead_max));
        }
        row("catch-up frames before joined (bytes)", format!("{} ({})", catch_up.frames, catch_up.bytes));
        for (kind, tally) in other {
            row(&format!("other frames: {kind} (bytes)"), format!("{} ({})", tally.frames, tally.bytes));
        }
        row(
            "other frames while sending (bytes)",
            format!("{} ({})", other_while_sending.frames, other_while_sending.bytes),
        );
        self.print_resource_rows();
    }

    /// The table's rows on memory, CPU, ended connections, signals, reconnects and refusals.
    fn print_resource_rows(&self) {
        let Report {
            args,
            rss_before,
            rss_idle,
            rss_end,
            kib_per_view,
            cpu_server,
            server_us_per_frame,
            cpu_self,
            active_seconds,
            cores,
            machine_busy_cores,
            other_cores,
            pressure_before,
            pressure_after,
            ended,
            signalled,
            refusals,
            ..
        } = self;
        let kib = |v: &Option<u64>| v.map_or("n/a".to_owned(), |v| format!("{v} KiB"));
        row("server RSS before viewers", kib(rss_before));
        row("server RSS, viewers joined and idle", kib(rss_idle));
        row("server RSS after sending", kib(rss_end));
        row("server RSS per idle view", kib_per_view.map_or("n/a".to_owned(), |k| format!("{k:.1} KiB")));
        row(
            "server CPU while sending (per delivered frame)",
            match (cpu_server, server_us_per_frame) {
                (Some(cpu), Some(us)) => format!("{cpu:.2} s of {active_seconds:.1} s ({us:.1} µs)"),
                _ => "n/a".to_owned(),
            },
        );
        row("loadgen CPU while sending", cpu_self.map_or("n/a".to_owned(), |cpu| format!("{cpu:.2} s")));
        row(
            "machine busy while sending (cores)",
            match (machine_busy_cores, other_cores) {
                (Some(busy), Some(other)) => format!("{busy:.2} of {cores}, of which other processes {other:.2}"),
                _ => "n/a".to_owned(),
            },
        );
        let pressure = |p: &Option<f64>| p.map_or("n/a".to_owned(), |p| format!("{p:.1} %"));
        row(
            "CPU pressure avg10 before / after sending",
            format!("{} / {}", pressure(pressure_before), pressure(pressure_after)),
        );
        for (why, count) in ended {
            row("connections ended early", format!("{count} × {why}"));
        }
        for signal in signalled {
            row("signal", signal.clone());
        }
        if args.reconnect {
            self.print_reconnect_rows();
        }
        for (reason, count) in refusals {
            row("sends refused", format!("{count} × {reason}"));
        }
    }

    /// The table's rows on reconnects (with `--reconnect`).
    fn print_reconnect_rows(&self) {
        let Report {
            joined, viewers_hit, viewers_lossless, reconnect_reasons, resets, sender_reconnects, resent, ..
        } = self;
        row("viewers reconnected / lossless (of joined)", format!("{viewers_hit} / {viewers_lossless} of {joined}"));
        for (why, count) in reconnect_reasons {
            row("  reconnects after", format!("{count} × {why}"));
        }
        row(
            "time to recover min / p50 / p99 / max (ms)",
            format!(
                "{:.0} / {:.0} / {:.0} / {:.0}",
                self.recovery_ms(0.0),
                self.recovery_ms(50.0),
                self.recovery_ms(99.0),
                self.recovery_ms(100.0)
            ),
        );
        row("reset frames (resume not exact)", resets.to_string());
        row("sender reconnects / sends repeated with the same id", format!("{sender_reconnects} / {resent}"));
    }

    /// Prints the report as one JSON line (`{"loadgen":…}`) for tools.
    pub(crate) fn print_json(&self) {
        let report = self.json();
        println!("{report}");
    }

    /// The report as JSON (`{"loadgen":…}`); tools read these names.
    fn json(&self) -> Value {
        let mut fields = serde_json::Map::new();
        for part in [self.run_json(), self.delivery_json(), self.resource_json(), self.ending_json()] {
            if let Value::Object(part) = part {
                fields.extend(part);
            }
        }
        json!({ "loadgen": fields })
    }

    /// The JSON fields on the run: its options, joins, sends and acknowledgements.
    fn run_json(&self) -> Value {
        let Report { args, room, senders, joined, join_errors, join_seconds, sent, send_seconds, .. } = self;
        let Report { acked_ok, acked_err, ack_us, .. } = self;
        json!({
            "url": args.url,
            "room": room,
            "viewers_requested": args.viewers,
            "viewers_joined": joined,
            "join_errors": join_errors,
            "join_seconds": join_seconds,
            "senders": senders,
            "rate_per_second": args.rate,
            "send_seconds": send_seconds,
            "content_bytes": args.content_bytes,
            "messages_sent": sent,
            "acked_ok": acked_ok,
            "acked_refused": acked_err,
            "ack_ms": {"p50": percentile(ack_us, 50.0), "p99": percentile(ack_us, 99.0)},
        })
    }

    /// The JSON fields on deliveries: counts, latencies, frame sizes and the other frames.
    fn delivery_json(&self) -> Value {
        let Report { expected, received, lost, duplicates, unknown, p50, p99, max, thirds_p99, .. } = self;
        let Report { last_viewer_us, sizes, catch_up, other, other_while_sending, .. } = self;
        json!({
            "deliveries_expected": expected,
            "deliveries_received": received,
            "lost": lost,
            "duplicates": duplicates,
            "unknown_msg_frames": unknown,
            "latency_ms": {"p50": p50, "p99": p99, "max": max},
            "latency_p99_ms_by_third": thirds_p99,
            "last_viewer_ms": {"p50": percentile(last_viewer_us, 50.0), "max": percentile(last_viewer_us, 100.0)},
            "msg_frame_bytes": {"min": sizes.frame_min.min(sizes.frame_max), "max": sizes.frame_max},
            "msg_html_bytes": {"min": sizes.html_min.min(sizes.html_max), "max": sizes.html_max},
            "msg_overhead_bytes": {"min": sizes.overhead_min.min(sizes.overhead_max), "max": sizes.overhead_max},
            "catch_up": {"frames": catch_up.frames, "bytes": catch_up.bytes},
            "other_frames": other.iter().map(|(k, t)| (k.clone(), json!({"frames": t.frames, "bytes": t.bytes})))
                .collect::<serde_json::Map<_, _>>(),
            "other_frames_while_sending": {"frames": other_while_sending.frames, "bytes": other_while_sending.bytes},
        })
    }

    /// The JSON fields on the server's memory and the CPU used while sending.
    fn resource_json(&self) -> Value {
        let Report { rss_before, rss_idle, rss_end, kib_per_view, cpu_server, server_us_per_frame, cpu_self, .. } =
            self;
        let Report { active_seconds, cores, machine_busy_cores, other_cores, pressure_before, pressure_after, .. } =
            self;
        json!({
            "server_rss_kib": {"before": rss_before, "idle": rss_idle, "end": rss_end},
            "server_kib_per_idle_view": kib_per_view,
            "server_cpu_seconds_while_sending": cpu_server,
            "server_cpu_us_per_delivered_frame": server_us_per_frame,
            "loadgen_cpu_seconds_while_sending": cpu_self,
            "active_seconds": active_seconds,
            "cores": cores,
            "machine_busy_cores_while_sending": machine_busy_cores,
            "other_processes_cores_while_sending": other_cores,
            "cpu_pressure_avg10": {"before": pressure_before, "after": pressure_after},
        })
    }

    /// The JSON fields on what went wrong: ended connections, refusals, signals, reconnects.
    fn ending_json(&self) -> Value {
        let Report { ended, refusals, signalled, viewers_hit, viewers_lossless, reconnect_reasons, .. } = self;
        let Report { resets, sender_reconnects, resent, .. } = self;
        let reconnect_report = json!({
            "viewers_reconnected": viewers_hit,
            "viewers_lossless": viewers_lossless,
            "reasons": reconnect_reasons,
            "recovery_ms": {"min": self.recovery_ms(0.0), "p50": self.recovery_ms(50.0), "p99": self.recovery_ms(99.0), "max": self.recovery_ms(100.0)},
            "resets": resets,
            "sender_reconnects": sender_reconnects,
            "resent_same_id": resent,
        });
        json!({
            "ended_early": ended,
            "refusals": refusals,
            "signals": signalled,
            "reconnect": reconnect_report,
        })
    }
}

/// One row of the table.
fn row(what: &str, value: String) {
    println!("{what:<48} {value}");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::Args;

    /// Loadgen's options for the sample report.
    fn sample_args() -> Args {
        Args {
            url: "ws://x/live".into(),
            viewers: 7,
            rate: 2.5,
            seconds: 3.0,
            content_bytes: 99,
            server_pid: Some(1),
            senders: None,
            batch: 2,
            room: None,
            shared_name: false,
            settle: 1.0,
            drain: 2.0,
            sender_url: None,
            reconnect: true,
            signals: vec![],
            check: false,
        }
    }

    /// A report with every section filled.
    fn sample_report(args: &Args) -> Report<'_> {
        let mut other = BTreeMap::new();
        other.insert("morph".to_owned(), Tally { frames: 3, bytes: 300 });
        other.insert("pong".to_owned(), Tally { frames: 1, bytes: 10 });
        let mut sizes = FrameSizes::default();
        sizes.add(500, 400);
        sizes.add(520, 410);
        let mut refusals = BTreeMap::new();
        refusals.insert("slow down", 2);
        Report {
            args,
            room: "r1",
            senders: 3,
            joined: 6,
            join_errors: [("boom".to_owned(), 1)].into(),
            join_seconds: 1.25,
            sent: 8,
            send_seconds: 3.1,
            acked_ok: 7,
            acked_err: 1,
            ack_us: vec![1000, 2000, 3500],
            expected: 42,
            received: 41,
            lost: 1,
            duplicates: 2,
            unknown: 3,
            p50: 1.5,
            p99: 9.25,
            max: f64::NAN,
            thirds_p99: vec![1.0, 2.0, 3.0],
            last_viewer_us: vec![100, 2000],
            sizes,
            catch_up: Tally { frames: 5, bytes: 50 },
            other,
            other_while_sending: Tally { frames: 2, bytes: 20 },
            rss_before: Some(1000),
            rss_idle: None,
            rss_end: Some(3000),
            kib_per_view: Some(1.5),
            cpu_server: Some(0.5),
            server_us_per_frame: Some(12.0),
            cpu_self: None,
            active_seconds: 4.0,
            cores: 2,
            machine_busy_cores: Some(1.5),
            other_cores: Some(0.25),
            pressure_before: Some(3.0),
            pressure_after: None,
            ended: [("eof".to_owned(), 2)].into(),
            signalled: vec!["SIGTERM 1 at 1 s: sent".into()],
            viewers_hit: 2,
            viewers_lossless: 5,
            reconnect_reasons: [("closed".to_owned(), 3)].into(),
            recoveries_us: vec![1000, 5000, 9000],
            resets: 1,
            sender_reconnects: 2,
            resent: 4,
            refusals,
        }
    }

    #[test]
    fn json_keeps_the_names_and_values_tools_read() {
        let args = sample_args();
        let report = sample_report(&args);
        // Recorded before the report was split into sections: tools parse this line.
        let expected = r#"{"loadgen":{"ack_ms":{"p50":2.0,"p99":3.5},"acked_ok":7,"acked_refused":1,"active_seconds":4.0,"catch_up":{"bytes":50,"frames":5},"content_bytes":99,"cores":2,"cpu_pressure_avg10":{"after":null,"before":3.0},"deliveries_expected":42,"deliveries_received":41,"duplicates":2,"ended_early":{"eof":2},"join_errors":{"boom":1},"join_seconds":1.25,"last_viewer_ms":{"max":2.0,"p50":0.1},"latency_ms":{"max":null,"p50":1.5,"p99":9.25},"latency_p99_ms_by_third":[1.0,2.0,3.0],"loadgen_cpu_seconds_while_sending":null,"lost":1,"machine_busy_cores_while_sending":1.5,"messages_sent":8,"msg_frame_bytes":{"max":520,"min":500},"msg_html_bytes":{"max":410,"min":400},"msg_overhead_bytes":{"max":110,"min":100},"other_frames":{"morph":{"bytes":300,"frames":3},"pong":{"bytes":10,"frames":1}},"other_frames_while_sending":{"bytes":20,"frames":2},"other_processes_cores_while_sending":0.25,"rate_per_second":2.5,"reconnect":{"reasons":{"closed":3},"recovery_ms":{"max":9.0,"min":1.0,"p50":5.0,"p99":9.0},"resent_same_id":4,"resets":1,"sender_reconnects":2,"viewers_lossless":5,"viewers_reconnected":2},"refusals":{"slow down":2},"room":"r1","send_seconds":3.1,"senders":3,"server_cpu_seconds_while_sending":0.5,"server_cpu_us_per_delivered_frame":12.0,"server_kib_per_idle_view":1.5,"server_rss_kib":{"before":1000,"end":3000,"idle":null},"signals":["SIGTERM 1 at 1 s: sent"],"unknown_msg_frames":3,"url":"ws://x/live","viewers_joined":6,"viewers_requested":7}}"#;
        assert_eq!(report.json().to_string(), expected);
    }
}
