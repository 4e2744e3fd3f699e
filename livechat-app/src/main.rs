//! `livechat-app`: runs the live chat.
//!
//! ```text
//! cargo run --release -p livechat-app -- [--listen ADDR] [--database-url URL]
//! ```
//! `--listen` (or `LISTEN`) defaults to `127.0.0.1:4000`; `--database-url` (or `DATABASE_URL`)
//! defaults to the SQLite file `./livechat.db`, and takes `sqlite://PATH`, `memory` or
//! `postgres://…`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livechat_app::server::{bind, describe_store, open_store, serve, DEFAULT_DATABASE_URL};
use livechat_app::{App, AppConfig};

const USAGE: &str = "usage: livechat-app [--listen ADDR] [--database-url URL]

  --listen ADDR        address to serve on (env LISTEN; default 127.0.0.1:4000)
  --database-url URL   where events are stored (env DATABASE_URL): sqlite://PATH (default
                       sqlite://livechat.db), memory, or postgres://user@host/db
  --allow-origin URL   also accept websockets and forms from this origin (repeatable)";

struct Args {
    listen: SocketAddr,
    database_url: String,
    allowed_origins: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:4000".to_owned());
    let mut database_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let mut allowed_origins = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| args.next()).with_context(|| format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--database-url" => database_url = value()?,
            "--allow-origin" => allowed_origins.push(value()?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let listen =
        listen.parse().with_context(|| format!("--listen {listen:?} is not an address like 127.0.0.1:4000"))?;
    Ok(Args { listen, database_url, allowed_origins })
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .init();
    let args = parse_args()?;
    let store = open_store(&args.database_url).await.context("opening the event store")?;
    let config = AppConfig { allowed_origins: args.allowed_origins, ..AppConfig::default() };
    let app = App::start(store, config, Duration::from_secs(60)).await;
    let listener = bind(args.listen)?;
    let addr = listener.local_addr().context("listener address")?;
    println!("livechat: storing events in {}", describe_store(&args.database_url));
    println!("livechat: open http://{addr}/");
    serve(listener, app, async {
        let _ = tokio::signal::ctrl_c().await;
        println!("livechat: shutting down");
    })
    .await?;
    Ok(())
}
