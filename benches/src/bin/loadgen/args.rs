//! The command line: options and their defaults.

use anyhow::{bail, Context, Result};

use crate::MARKER;

pub(crate) const USAGE: &str = "usage: loadgen [options]

  --url URL            websocket endpoint (default ws://127.0.0.1:4700/live)
  --addr HOST:PORT     same as --url ws://HOST:PORT/live
  --viewers N          idle readers in the room (default 1000)
  --rate R             new messages per second (default 10)
  --seconds S          how long to send (default 30)
  --content-bytes B    bytes of message text (default 120, at least 14)
  --server-pid PID     read the server's VmRSS and CPU time from /proc/PID
  --senders N          sender connections, one name each (default max(1, ceil(2 * rate)))
  --batch N            viewers connecting at once (default 200)
  --room ID            room to use (default load-<unix time>, fresh each run)
  --shared-name        all viewers use one name (no presence churn while they join)
  --settle S           idle wait before the second RSS reading (default 3)
  --drain S            give up waiting for deliveries after S seconds without progress (default 10)
  --quick              100 viewers, 5 seconds (smoke run)

A deployment behind a balancer (scripts/cluster, scripts/cluster-test):
  --sender-url URL     senders connect here (default --url): the sender on one node
  --reconnect          viewers and senders reconnect when their socket ends, as the page
                       does: a viewer rejoins after the last position it has (resume), a
                       sender resends what was not acknowledged with the same command ids
  --kill PID@S         SIGKILL process PID S seconds after sending starts (repeatable)
  --term PID@S         SIGTERM (graceful shutdown) PID at S seconds (repeatable: a rolling
                       restart, with a supervisor that starts the node again)
  --check              exit 1 unless every viewer joined, every message was stored once
                       (acknowledged), and every viewer got each exactly once";

#[derive(Debug, Clone)]
pub(crate) struct Args {
    pub(crate) url: String,
    pub(crate) viewers: usize,
    pub(crate) rate: f64,
    pub(crate) seconds: f64,
    pub(crate) content_bytes: usize,
    pub(crate) server_pid: Option<u32>,
    pub(crate) senders: Option<usize>,
    pub(crate) batch: usize,
    pub(crate) room: Option<String>,
    pub(crate) shared_name: bool,
    pub(crate) settle: f64,
    pub(crate) drain: f64,
    pub(crate) sender_url: Option<String>,
    pub(crate) reconnect: bool,
    pub(crate) signals: Vec<(u32, f64, &'static str)>,
    pub(crate) check: bool,
}

pub(crate) fn parse_args() -> Result<Args> {
    let mut args = Args {
        url: "ws://127.0.0.1:4700/live".to_owned(),
        viewers: 1000,
        rate: 10.0,
        seconds: 30.0,
        content_bytes: 120,
        server_pid: None,
        senders: None,
        batch: 200,
        room: None,
        shared_name: false,
        settle: 3.0,
        drain: 10.0,
        sender_url: None,
        reconnect: false,
        signals: Vec::new(),
        check: false,
    };
    let signal = |text: String, name: &'static str| -> Result<(u32, f64, &'static str)> {
        let (pid, at) = text.split_once('@').with_context(|| format!("--{name} takes PID@SECONDS, not {text:?}"))?;
        Ok((pid.parse().context("pid")?, at.parse().context("seconds")?, name))
    };
    let mut raw = std::env::args().skip(1);
    while let Some(arg) = raw.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value = || inline.clone().or_else(|| raw.next()).with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => args.url = value()?,
            "--addr" => args.url = format!("ws://{}/live", value()?),
            "--viewers" => args.viewers = value()?.parse().context("--viewers")?,
            "--rate" => args.rate = value()?.parse().context("--rate")?,
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--content-bytes" => args.content_bytes = value()?.parse().context("--content-bytes")?,
            "--server-pid" => args.server_pid = Some(value()?.parse().context("--server-pid")?),
            "--senders" => args.senders = Some(value()?.parse().context("--senders")?),
            "--batch" => args.batch = value()?.parse().context("--batch")?,
            "--room" => args.room = Some(value()?),
            "--shared-name" => args.shared_name = true,
            "--settle" => args.settle = value()?.parse().context("--settle")?,
            "--drain" => args.drain = value()?.parse().context("--drain")?,
            "--sender-url" => args.sender_url = Some(value()?),
            "--reconnect" => args.reconnect = true,
            "--kill" => args.signals.push(signal(value()?, "kill")?),
            "--term" => args.signals.push(signal(value()?, "term")?),
            "--check" => args.check = true,
            "--quick" => {
                args.viewers = 100;
                args.seconds = 5.0;
                args.settle = 1.0;
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if args.content_bytes < MARKER.len() + 9 {
        bail!("--content-bytes must be at least {}", MARKER.len() + 9);
    }
    if args.rate <= 0.0 || args.seconds <= 0.0 || args.batch == 0 {
        bail!("--rate, --seconds and --batch must be positive");
    }
    Ok(args)
}
