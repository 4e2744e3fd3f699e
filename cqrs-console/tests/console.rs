//! The console's pages and actions through its router, mounted under `/ops` as an application
//! would, against real SQLite and PostgreSQL stores (PostgreSQL from `DATABASE_URL`, as every
//! PostgreSQL test of the workspace; `scripts/test` starts one).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use cqrs_console::{router, Access, ConsoleConfig};
use cqrs_core::testing::counter::{Counter, CounterCommand, CounterEvent};
use cqrs_core::{
    spawn_handler, CommandEnvelope, CommandId, CorrelationId, Dispatcher, Envelope, EventHandler, HandlerError,
    HandlerState, Position, ProcessState, Progress, RunnerConfig, RunningHandler, Scheduled, Store, Timestamp,
};
use http_body_util::BodyExt;
use sqlx::{Connection, Executor};
use tokio::time::Instant;
use tower::ServiceExt;

const TOKEN: &str = "s3cret-token";

#[derive(Clone)]
struct Recorder(Arc<Mutex<Vec<u64>>>);

impl EventHandler for Recorder {
    type Event = CounterEvent;
    fn name(&self) -> &str {
        "recorder"
    }
    async fn handle(&self, event: Envelope<CounterEvent>) -> Result<(), HandlerError> {
        self.0.lock().expect("lock").push(event.position.0);
        Ok(())
    }
}

struct Reply {
    status: StatusCode,
    cookie: Option<String>,
    body: String,
}

async fn call(app: &Router, method: &str, path: &str, headers: &[(&str, &str)], form: Option<&str>) -> Reply {
    let mut request = Request::builder().method(method).uri(path).header(header::HOST, "ops.example");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let body = match form {
        Some(form) => {
            request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
            Body::from(form.to_owned())
        }
        None => Body::empty(),
    };
    let response = app.clone().oneshot(request.body(body).expect("request")).await.expect("response");
    let status = response.status();
    let cookie = response.headers().get(header::SET_COOKIE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bytes = response.into_body().collect().await.expect("body").to_bytes();
    Reply { status, cookie, body: String::from_utf8_lossy(&bytes).into_owned() }
}

const BEARER: (&str, &str) = ("authorization", "Bearer s3cret-token");

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The whole walk through the console on one store.
async fn console_walk<S: Store>(store: Arc<S>) {
    let progress = Progress::new();
    let dispatcher = Dispatcher::<Counter, _>::new(Arc::clone(&store));
    let conversation = CorrelationId::new();
    for n in 0..10 {
        let command = CommandEnvelope::new(CounterCommand::increment(n % 3, 1)).with_correlation_id(conversation);
        dispatcher.dispatch(command).await.expect("dispatch");
    }
    let handled = Arc::new(Mutex::new(Vec::new()));
    let config = RunnerConfig {
        claim_ttl: Duration::from_millis(900),
        claim_retry: Duration::from_millis(50),
        checkpoint_delay: Duration::ZERO,
        ..RunnerConfig::default()
    };
    let running: RunningHandler = spawn_handler(Arc::clone(&store), Recorder(Arc::clone(&handled)), config, &progress);
    let head = store.head().await.expect("head");
    progress.wait_for("recorder", head, Duration::from_secs(20)).await.expect("caught up");
    let count = || handled.lock().expect("lock").len();
    assert_eq!(count(), 10);

    let app = Router::new().nest(
        "/ops",
        router(Arc::clone(&store) as Arc<dyn Store>, progress.clone(), ConsoleConfig::new(Access::bearer(TOKEN))),
    );

    // Access: nothing without the token; the login page offered.
    let refused = call(&app, "GET", "/ops/handlers", &[], None).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.body.contains("id=\"login\""), "the 401 offers the login form");
    let wrong = call(&app, "GET", "/ops/handlers", &[("authorization", "Bearer nope")], None).await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let page = call(&app, "GET", "/ops/handlers", &[BEARER], None).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("data-handler=\"recorder\""), "{}", page.body);
    assert!(page.body.contains(&format!("data-position=\"{}\"", head.0)), "its position is shown");
    assert!(page.body.contains("data-state=\"running\""));
    assert!(page.body.contains("href=\"/ops/streams\""), "links carry the mount path");

    // A browser logs in; its forms need this host's Origin.
    let login = call(&app, "POST", "/ops/login", &[], Some("token=s3cret-token")).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    let cookie = login.cookie.expect("cookie set");
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict") && cookie.contains("Path=/ops"));
    let cookie = cookie.split(';').next().expect("pair").to_owned();
    let bad_login = call(&app, "POST", "/ops/login", &[], Some("token=guess")).await;
    assert_eq!(bad_login.status, StatusCode::UNAUTHORIZED);
    assert!(bad_login.cookie.is_none());
    let no_origin = call(&app, "POST", "/ops/handlers/recorder/pause", &[("cookie", &cookie)], Some("")).await;
    assert_eq!(no_origin.status, StatusCode::FORBIDDEN, "a cookie form without Origin is refused");
    let foreign = call(
        &app,
        "POST",
        "/ops/handlers/recorder/pause",
        &[("cookie", &cookie), ("origin", "https://evil.example")],
        Some(""),
    )
    .await;
    assert_eq!(foreign.status, StatusCode::FORBIDDEN);
    assert!(matches!(running.status().state, HandlerState::Running), "refused forms changed nothing");

    // Pause from the browser.
    let paused = call(
        &app,
        "POST",
        "/ops/handlers/recorder/pause",
        &[("cookie", &cookie), ("origin", "http://ops.example")],
        Some(""),
    )
    .await;
    assert_eq!(paused.status, StatusCode::SEE_OTHER);
    wait_until("the runner paused", || matches!(running.status().state, HandlerState::Paused { .. })).await;
    let page = call(&app, "GET", "/ops/handlers", &[BEARER], None).await;
    assert!(page.body.contains("data-state=\"paused by token (browser)\""), "{}", page.body);

    // Reset to 4: the confirmation names what will be handled again.
    let confirm = call(&app, "GET", "/ops/handlers/recorder/reset?to=4", &[BEARER], None).await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm.body.contains(&format!("data-again=\"{}\"", head.0 - 4)), "{}", confirm.body);
    assert!(confirm.body.contains("side effects"));
    let unconfirmed = call(&app, "POST", "/ops/handlers/recorder/reset", &[BEARER], Some("to=4")).await;
    assert_eq!(unconfirmed.status, StatusCode::BAD_REQUEST);
    let garbage = call(&app, "POST", "/ops/handlers/recorder/reset", &[BEARER], Some("to=x&confirm=yes")).await;
    assert_eq!(garbage.status, StatusCode::BAD_REQUEST);
    assert_eq!(store.load_checkpoint("recorder").await.expect("checkpoint"), Some(head), "refusals changed nothing");
    let reset = call(&app, "POST", "/ops/handlers/recorder/reset", &[BEARER], Some("to=4&confirm=yes")).await;
    assert_eq!(reset.status, StatusCode::SEE_OTHER, "{}", reset.body);
    assert_eq!(store.load_checkpoint("recorder").await.expect("checkpoint"), Some(Position(4)));
    assert!(
        matches!(running.status().state, HandlerState::Paused { .. }),
        "a handler paused before the reset stays paused"
    );
    assert_eq!(count(), 10, "nothing handled while paused");
    let resumed = call(&app, "POST", "/ops/handlers/recorder/resume", &[BEARER], Some("")).await;
    assert_eq!(resumed.status, StatusCode::SEE_OTHER);
    wait_until("the events after 4 handled again", || count() == 10 + (head.0 as usize - 4)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let again: Vec<u64> = handled.lock().expect("lock")[10..].to_vec();
    assert_eq!(again, (5..=head.0).collect::<Vec<_>>(), "exactly the events after 4, once each");

    // A reset of a running handler pauses it for the move and resumes it.
    let reset = call(&app, "POST", "/ops/handlers/recorder/reset", &[BEARER], Some("to=8&confirm=yes")).await;
    assert_eq!(reset.status, StatusCode::SEE_OTHER, "{}", reset.body);
    wait_until("the events after 8 handled again", || count() == 10 + (head.0 as usize - 4) + (head.0 as usize - 8))
        .await;
    wait_until("running again", || matches!(running.status().state, HandlerState::Running)).await;

    // The log: by position, stream, category; one event; its correlation.
    let log = call(&app, "GET", "/ops/streams?after=2", &[BEARER], None).await;
    assert_eq!(log.status, StatusCode::OK);
    assert!(log.body.contains("data-position=\"3\"") && !log.body.contains("data-position=\"2\""));
    let first = store.read_all(Position::START, 1).await.expect("read").remove(0);
    let stream = call(&app, "GET", &format!("/ops/streams?stream={}", first.stream_id), &[BEARER], None).await;
    assert_eq!(stream.body.matches("<tr data-position").count(), 4, "counter 0 has 4 of the 10 events");
    let category = call(&app, "GET", &format!("/ops/streams?category={}", first.category()), &[BEARER], None).await;
    assert_eq!(category.body.matches("<tr data-position").count(), 10);
    let none = call(&app, "GET", "/ops/streams?category=nothing", &[BEARER], None).await;
    assert_eq!(none.body.matches("<tr data-position").count(), 0);
    let event = call(&app, "GET", "/ops/events/1", &[BEARER], None).await;
    assert_eq!(event.status, StatusCode::OK);
    assert!(event.body.contains(&first.event_id.to_string()));
    assert!(event.body.contains("id=\"payload\""));
    assert_eq!(call(&app, "GET", "/ops/events/999", &[BEARER], None).await.status, StatusCode::NOT_FOUND);
    assert_eq!(call(&app, "GET", "/ops/events/x", &[BEARER], None).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(first.metadata.correlation_id, Some(conversation));
    let chain = call(&app, "GET", &format!("/ops/correlations/{conversation}"), &[BEARER], None).await;
    assert_eq!(chain.body.matches("<tr data-position").count(), 10, "every event of the conversation");
    let other = call(&app, "GET", &format!("/ops/correlations/{}", CorrelationId::new()), &[BEARER], None).await;
    assert_eq!(other.body.matches("<tr data-position").count(), 0);

    // Process managers: instances, pending schedules, set-aside ones retried and discarded.
    processes_page(&store, &progress).await;

    // The other pages answer.
    let css = call(&app, "GET", "/ops/console.css", &[], None).await;
    assert_eq!(css.status, StatusCode::OK, "the style sheet is open: the login page needs it");
    assert!(page.body.contains("href=\"/ops/console.css\""), "no inline style, for apps whose CSP forbids it");
    let home = call(&app, "GET", "/ops", &[BEARER], None).await;
    assert!(home.body.contains("href=\"/ops/streams\""), "the mount path is found from /ops too");
    for path in ["/ops/processes", "/ops/rebuilds", "/ops/handlers/recorder/parked", "/ops"] {
        let reply = call(&app, "GET", path, &[BEARER], None).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.body);
    }
    // A mistyped handler name changes nothing.
    let nope = call(&app, "POST", "/ops/handlers/nope/pause", &[BEARER], Some("")).await;
    assert_eq!(nope.status, StatusCode::NOT_FOUND, "{}", nope.body);
    let nope = call(&app, "POST", "/ops/handlers/nope/reset", &[BEARER], Some("to=0&confirm=yes")).await;
    assert_eq!(nope.status, StatusCode::NOT_FOUND, "{}", nope.body);
    assert!(store.claims().await.expect("claims").iter().all(|claim| !claim.name.contains("nope")));
    assert_eq!(store.load_checkpoint("nope").await.expect("checkpoint"), None);
    let unknown = call(&app, "POST", "/ops/handlers/recorder/parked/retry", &[BEARER], Some("position=3")).await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    let denied = Router::new().nest(
        "/ops",
        router(Arc::clone(&store) as Arc<dyn Store>, progress.clone(), ConsoleConfig::new(Access::deny_all())),
    );
    assert_eq!(call(&denied, "GET", "/ops/handlers", &[BEARER], None).await.status, StatusCode::FORBIDDEN);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_sqlite() {
    let dir = tempfile::tempdir().expect("dir");
    let store = cqrs_sqlite::SqliteEventStore::open(dir.path().join("events.db")).await.expect("open");
    console_walk(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_on_postgres() {
    let server = std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: this test needs a PostgreSQL server. Run `scripts/test`, \
         or `source scripts/postgres.sh; pg_start` and then cargo test",
    );
    let name = format!("cqrs_console_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&server).await.expect("connect");
    admin.execute(format!("CREATE DATABASE {name}").as_str()).await.expect("create database");
    let (base, query) = server.split_once('?').map_or((server.as_str(), None), |(b, q)| (b, Some(q)));
    let root = &base[..base.rfind('/').filter(|i| *i > base.find("://").map_or(0, |s| s + 2)).unwrap_or(base.len())];
    let url = match query {
        Some(query) => format!("{root}/{name}?{query}"),
        None => format!("{root}/{name}"),
    };
    {
        let store = cqrs_postgres::PgEventStore::connect(&url).await.expect("connect store");
        store.migrate().await.expect("migrate");
        console_walk(Arc::new(store)).await;
    }
    admin.execute(format!("DROP DATABASE {name} WITH (FORCE)").as_str()).await.expect("drop database");
}

/// The processes page of a console configured with process manager `orders`, over state
/// written through the store's own coordination methods.
async fn processes_page<S: Store>(store: &Arc<S>, progress: &Progress) {
    let app = Router::new().nest(
        "/ops",
        router(
            Arc::clone(store) as Arc<dyn Store>,
            progress.clone(),
            ConsoleConfig::new(Access::bearer(TOKEN)).with_processes(["orders"]),
        ),
    );
    let state = ProcessState::running(serde_json::json!({"paid": false}), Position(3));
    store.save_process("orders", "order-17", Some(&state), None).await.expect("save process");
    let schedule = |name: &str, due: i64| Scheduled {
        owner: "orders".into(),
        key: "order-17".into(),
        name: name.into(),
        due: Timestamp(due),
        command: serde_json::json!({"cancel": "order-17"}),
        command_id: CommandId::new(),
        attempts: 0,
    };
    let (deadline, reminder, failing) =
        (schedule("deadline", 4_000_000_000_000_000), schedule("reminder", 1), schedule("charge", 2));
    for scheduled in [&deadline, &reminder, &failing] {
        store.schedule(scheduled.clone()).await.expect("schedule");
    }
    assert!(store.scheduled_failed(&reminder, "card declined", None).await.expect("set aside"));
    assert!(store.scheduled_failed(&failing, "gateway down", None).await.expect("set aside"));

    let page = call(&app, "GET", "/ops/processes", &[BEARER], None).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("data-process=\"orders\""), "{}", page.body);
    assert!(page.body.contains("<tr data-key=\"order-17\"><td>order-17</td><td>running</td>"), "{}", page.body);
    assert!(page.body.contains("card declined") && page.body.contains("gateway down"));

    let retried =
        call(&app, "POST", "/ops/processes/orders/scheduled/retry", &[BEARER], Some("key=order-17&name=reminder"))
            .await;
    assert_eq!(retried.status, StatusCode::SEE_OTHER, "{}", retried.body);
    let discarded =
        call(&app, "POST", "/ops/processes/orders/scheduled/discard", &[BEARER], Some("key=order-17&name=charge"))
            .await;
    assert_eq!(discarded.status, StatusCode::SEE_OTHER, "{}", discarded.body);
    let again =
        call(&app, "POST", "/ops/processes/orders/scheduled/discard", &[BEARER], Some("key=order-17&name=charge"))
            .await;
    assert_eq!(again.status, StatusCode::NOT_FOUND, "a discarded command is gone");
    assert!(store.set_aside_scheduled("orders").await.expect("set aside").is_empty());
    let due: Vec<String> =
        store.due("orders", Timestamp(10), 10).await.expect("due").into_iter().map(|s| s.name).collect();
    assert_eq!(due, ["reminder"], "the retried command is due again; the discarded one never fires");
    let page = call(&app, "GET", "/ops/processes", &[BEARER], None).await;
    assert!(!page.body.contains("card declined") && !page.body.contains("gateway down"));
}
