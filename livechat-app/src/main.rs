//! `livechat-app`: runs the live chat.
//!
//! ```text
//! cargo run --release -p livechat-app -- [--listen ADDR] [--database-url URL] [--allow-origin URL]
//!     [--behind-tls] [--trust-proxy NET|none] [--max-connections N] [--max-connections-per-address N]
//!     [--admin-listen ADDR|off] [--admin-token TOKEN]
//! ```
//! `--listen` (or `LISTEN`) defaults to `127.0.0.1:4000`; `--database-url` (or `DATABASE_URL`)
//! defaults to the SQLite file `./livechat.db`, and takes `sqlite://PATH`, `memory` or
//! `postgres://…`. See `USAGE` for the rest.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use livechat_app::notify::{Notifications, WebhookDelivery};
use livechat_app::server::{bind, bind_admin, describe_store, open, serve_with_admin, DEFAULT_DATABASE_URL};
use livechat_app::web::security::TrustedProxies;
use livechat_app::{App, AppConfig};

const USAGE: &str = "usage: livechat-app [--listen ADDR] [--database-url URL] [options]

  --listen ADDR        address to serve on (env LISTEN; default 127.0.0.1:4000)
  --database-url URL   where events are stored (env DATABASE_URL): sqlite://PATH (default
                       sqlite://livechat.db), memory, or postgres://user@host/db
  --allow-origin URL   also accept websockets and forms from this origin, and requests for its
                       host (repeatable)
  --behind-tls         every request arrives over TLS (a TLS proxy in front): Secure cookies
  --trust-proxy NET    believe X-Forwarded-For/-Proto from this address or network (repeatable;
                       default 127.0.0.0/8 and ::1; `none` trusts no proxy)
  --max-connections N  connections open at once (default 10000; at most the open-files
                       limit less 64)
  --max-connections-per-address N
                       connections open at once from one client address (default 128)
  --mention-webhook URL
                       POST each @mention as JSON to this http:// URL (default: log it; `off`:
                       no notifier in this process). One process of a cluster delivers.
  --admin-listen ADDR  a second, loopback-only listener where the console (/admin) answers without a
                       token (env LIVECHAT_ADMIN_LISTEN; default 127.0.0.1:0, a free port,
                       printed at start; `off`: none). Never point a proxy at it.
  --admin-token TOKEN  open the console (/admin) on any listener to requests with
                       `Authorization: Bearer TOKEN` (env LIVECHAT_ADMIN_TOKEN)
  --node-name NAME     this process's name in handler claims (default host:pid:random)
  --otlp-endpoint URL  export spans over OTLP/HTTP to this collector, e.g. http://127.0.0.1:4318
                       (env OTEL_EXPORTER_OTLP_ENDPOINT; needs the `otel` cargo feature)";

struct Args {
    listen: SocketAddr,
    admin_listen: Option<SocketAddr>,
    database_url: String,
    config: AppConfig,
    otlp_endpoint: Option<String>,
}

fn parse_args() -> Result<Args> {
    let mut listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:4000".to_owned());
    let mut admin_listen = std::env::var("LIVECHAT_ADMIN_LISTEN").unwrap_or_else(|_| "127.0.0.1:0".to_owned());
    let mut database_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_owned());
    let mut config = AppConfig::default();
    let mut proxies: Option<TrustedProxies> = None;
    config.admin_token = std::env::var("LIVECHAT_ADMIN_TOKEN").ok().filter(|token| !token.is_empty());
    let mut otlp_endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok().filter(|url| !url.is_empty());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value.to_owned())),
            _ => (arg.clone(), None),
        };
        let mut value =
            || inline.clone().or_else(|| args.next()).with_context(|| format!("{flag} needs a value\n{USAGE}"));
        let number = |text: String| -> Result<usize> {
            text.parse().with_context(|| format!("{flag} takes a number, not {text:?}"))
        };
        match flag.as_str() {
            "--listen" => listen = value()?,
            "--admin-listen" => admin_listen = value()?,
            "--database-url" => database_url = value()?,
            "--allow-origin" => config.allowed_origins.push(value()?),
            "--behind-tls" => config.behind_tls = true,
            "--trust-proxy" => {
                let network = value()?;
                let trusted = proxies.get_or_insert_with(TrustedProxies::none);
                if network != "none" {
                    trusted.add(&network)?;
                }
            }
            "--max-connections" => config.limits.max_connections = number(value()?)?,
            "--max-connections-per-address" => config.limits.max_connections_per_address = number(value()?)?,
            "--otlp-endpoint" => otlp_endpoint = Some(value()?),
            "--mention-webhook" => {
                let url = value()?;
                config.notifier.notifications = if url == "off" {
                    Notifications::Off
                } else {
                    WebhookDelivery::new(&url).with_context(|| format!("--mention-webhook {url:?}"))?;
                    Notifications::Webhook(url)
                };
            }
            "--admin-token" => config.admin_token = Some(value()?).filter(|token| !token.is_empty()),
            "--node-name" => {
                let name = value()?;
                // Distinct for every run even under a fixed name: a restarted node must not
                // mistake the claim of its previous life for its own.
                config.node =
                    format!("{name}:{}:{}", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    let listen =
        listen.parse().with_context(|| format!("--listen {listen:?} is not an address like 127.0.0.1:4000"))?;
    let admin_listen = match admin_listen.as_str() {
        "off" | "" => None,
        text => Some(
            text.parse().with_context(|| format!("--admin-listen {text:?} is not an address like 127.0.0.1:4001"))?,
        ),
    };
    if let Some(proxies) = proxies {
        config.trusted_proxies = proxies;
    }
    if otlp_endpoint.is_some() && !cfg!(feature = "otel") {
        bail!("--otlp-endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) needs a build with the `otel` feature: cargo run --release -p livechat-app --features otel");
    }
    Ok(Args { listen, admin_listen, database_url, config, otlp_endpoint })
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let tracing = init_tracing(args.otlp_endpoint.as_deref())?;
    raise_open_files_limit();
    let opened = open(&args.database_url).await.context("opening the event store")?;
    let mut app = App::start(opened.store, args.config, Duration::from_secs(60)).await;
    if let Some(search) = opened.search {
        app.start_search(search).await.context("starting the search index")?;
    }
    if let Some(pool) = opened.postgres {
        // Every process on this database is one chat: presence and typing too.
        app.join_cluster(pool);
    }
    let listener = bind(args.listen)?;
    let addr = listener.local_addr().context("listener address")?;
    let admin = args.admin_listen.map(bind_admin).transpose()?;
    println!("livechat: storing events in {}", describe_store(&args.database_url));
    if let Some(admin) = &admin {
        let admin = admin.local_addr().context("admin listener address")?;
        println!("livechat: admin (this machine only): http://{admin}/admin");
    }
    println!("livechat: open http://{addr}/");
    serve_with_admin(listener, admin, app, async {
        let signal = stop_signal().await;
        println!("livechat: {signal}: shutting down (views are told to reconnect; requests in flight finish)");
    })
    .await?;
    tracing.shutdown();
    Ok(())
}

/// What was installed for `tracing`; flushes exported spans at shutdown.
struct Tracing {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Tracing {
    fn shutdown(self) {
        #[cfg(feature = "otel")]
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("livechat: flushing spans to the OTLP collector failed: {error}");
            }
        }
    }
}

/// Logs to stderr filtered by `RUST_LOG` (default `info,sqlx=warn`), and with `otlp_endpoint`
/// (the `otel` feature) exports spans over OTLP, with trace context carried in event headers.
fn init_tracing(otlp_endpoint: Option<&str>) -> Result<Tracing> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    let registry = tracing_subscriber::registry().with(filter).with(tracing_subscriber::fmt::layer());
    #[cfg(feature = "otel")]
    {
        let provider = match otlp_endpoint {
            Some(endpoint) => {
                let provider = livechat_app::otel::otlp_provider(endpoint)?;
                livechat_app::otel::install_propagation();
                println!("livechat: exporting spans over OTLP to {endpoint}");
                Some(provider)
            }
            None => None,
        };
        registry.with(provider.as_ref().map(livechat_app::otel::layer)).try_init()?;
        Ok(Tracing { provider })
    }
    #[cfg(not(feature = "otel"))]
    {
        let _ = otlp_endpoint;
        registry.try_init()?;
        Ok(Tracing {})
    }
}

/// Waits for Ctrl-C or SIGTERM (what `kill`, systemd and container runtimes send to stop a
/// process, e.g. in a rolling restart) and names it.
async fn stop_signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => tokio::select! {
                _ = tokio::signal::ctrl_c() => "interrupted",
                _ = terminate.recv() => "terminated",
            },
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server gracefully");
                let _ = tokio::signal::ctrl_c().await;
                "interrupted"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "interrupted"
    }
}

/// Raises the open-files soft limit to the hard limit (the default soft limit, often 1024,
/// would end accepting long before the connection cap). The app then caps connections under
/// whatever limit there is, less a reserve (`livechat_app::limits::cap_for_open_files`).
fn raise_open_files_limit() {
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        tracing::warn!(%error, "cannot raise the open-files limit");
    }
}
