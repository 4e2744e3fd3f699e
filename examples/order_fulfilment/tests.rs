//! The example's tests: the process manager alone, and the whole shop on SQLite and PostgreSQL.

use std::sync::atomic::Ordering;

use cqrs_core::testing::ProcessTest;

use super::fulfilment::{FulfilmentEvent, Progress as State};
use super::inventory::Reservation;
use super::*;

fn placed(order_id: &str, card: &str) -> FulfilmentEvent {
    let lines = vec![Line { sku: "tea".into(), quantity: 2 }, Line { sku: "mug".into(), quantity: 1 }];
    FulfilmentEvent::OrderPlaced(order::Placed {
        order_id: order_id.into(),
        lines,
        total_cents: 1350,
        card: card.into(),
    })
}

fn reserved(order_id: &str, sku: &str, quantity: u32) -> FulfilmentEvent {
    FulfilmentEvent::StockReserved(Reservation { sku: sku.into(), order_id: order_id.into(), quantity })
}

#[test]
fn placing_reserves_every_line_and_schedules_the_deadline() {
    let then = ProcessTest::new(Fulfilment)
        .when("order-1", placed("order-1", "ok"))
        .then_routed(Route::Start("order-1".into()))
        .then_commands(vec![
            FulfilmentCommand::Inventory(InventoryCommand::Reserve {
                sku: "tea".into(),
                order_id: "order-1".into(),
                quantity: 2,
            }),
            FulfilmentCommand::Inventory(InventoryCommand::Reserve {
                sku: "mug".into(),
                order_id: "order-1".into(),
                quantity: 1,
            }),
        ])
        .then_scheduled(vec![(
            "payment-deadline",
            FulfilmentCommand::Order(OrderCommand::CancelIfUnpaid { order_id: "order-1".into() }),
        )]);
    let due = then.effects().scheduled()[0].1;
    assert_eq!(due, then.recorded_at().plus(fulfilment::PAYMENT_DEADLINE), "15 minutes after the order");
}

#[test]
fn the_last_reservation_takes_the_payment() {
    ProcessTest::new(Fulfilment)
        .given(vec![("order-1", placed("order-1", "ok")), ("inventory-tea", reserved("order-1", "tea", 2))])
        .when("inventory-mug", reserved("order-1", "mug", 1))
        .then_commands(vec![FulfilmentCommand::Payment(payment::PaymentCommand::Take {
            order_id: "order-1".into(),
            amount_cents: 1350,
            card: "ok".into(),
        })]);
}

#[test]
fn a_refused_line_cancels_the_order_and_the_cancellation_releases_what_was_reserved() {
    let refused =
        FulfilmentEvent::ReservationRefused(Reservation { sku: "mug".into(), order_id: "order-1".into(), quantity: 1 });
    let history = vec![("order-1", placed("order-1", "ok")), ("inventory-tea", reserved("order-1", "tea", 2))];
    ProcessTest::new(Fulfilment).given(history.clone()).when("inventory-mug", refused.clone()).then_commands(vec![
        FulfilmentCommand::Order(OrderCommand::Cancel {
            order_id: "order-1".into(),
            reason: "out of stock: mug".into(),
        }),
    ]);
    let cancelled = FulfilmentEvent::OrderCancelled(order::Cancelled {
        order_id: "order-1".into(),
        reason: "out of stock: mug".into(),
    });
    let mut history = history;
    history.push(("inventory-mug", refused));
    let then = ProcessTest::new(Fulfilment)
        .given(history)
        .when("order-1", cancelled)
        .then_routed(Route::Stop("order-1".into()))
        .then_commands(vec![FulfilmentCommand::Inventory(InventoryCommand::Release {
            sku: "tea".into(),
            order_id: "order-1".into(),
        })]);
    assert!(then.state().is_some_and(|state: &State| state.failing));
}

#[test]
fn payment_confirms_and_cancels_the_deadline() {
    let taken = FulfilmentEvent::PaymentTaken(payment::Payment { order_id: "order-1".into(), amount_cents: 1350 });
    ProcessTest::new(Fulfilment)
        .given(vec![("order-1", placed("order-1", "ok"))])
        .when("payment-order-1", taken)
        .then_commands(vec![FulfilmentCommand::Order(OrderCommand::Confirm { order_id: "order-1".into() })])
        .then_cancelled(vec!["payment-deadline"]);
}

#[test]
fn a_refused_cancel_undoes_nothing() {
    let declined = FulfilmentEvent::PaymentDeclined(payment::Declined {
        order_id: "order-1".into(),
        reason: "card declined".into(),
    });
    ProcessTest::new(Fulfilment)
        .given(vec![("order-1", placed("order-1", "bad"))])
        .when("payment-order-1", declined)
        .when_rejected("cancel", Rejection::from_message("the order is confirmed"))
        .then_no_commands()
        .then_cancelled(vec![]);
}

#[test]
fn events_of_orders_never_started_are_ignored() {
    ProcessTest::new(Fulfilment).when("inventory-tea", reserved("order-9", "tea", 1)).then_no_commands();
}

/// Claims that lapse fast, so a restarted process takes over quickly after a crash.
fn fast() -> RunnerConfig {
    RunnerConfig {
        claim_ttl: Duration::from_millis(300),
        claim_retry: Duration::from_millis(50),
        initial_backoff: Duration::from_millis(5),
        ..RunnerConfig::default()
    }
}

/// The story without a crash: its end state and how many commands the manager sent.
async fn baseline(url: &str) -> (Summary, usize) {
    let backend = Backend::open(url).await.expect("open");
    let (clock, control) = Clock::test();
    let shop = Shop::start(backend, clock, fast(), None);
    let summary = run_story(&shop, &control).await.expect("the story");
    let sent = shop.commands_sent();
    shop.stop().await;
    (summary, sent)
}

/// Crashes the process manager after its `k`-th command (the next one never returns),
/// drops everything, reopens the store and starts again; returns the end state.
async fn crash_after(url: &str, k: usize) -> Summary {
    let backend = Backend::open(url).await.expect("open");
    let (clock, control) = Clock::test();
    let crashed = Arc::new(tokio::sync::Notify::new());
    let shop = Shop::start(backend, clock.clone(), fast(), Some((k, Arc::clone(&crashed))));
    let advanced = std::sync::atomic::AtomicBool::new(false);
    let story = async {
        place_orders(&shop).await.expect("place");
        if wait_settled(&shop, false).await.is_ok() {
            control.advance(fulfilment::PAYMENT_DEADLINE + Duration::from_secs(60));
            advanced.store(true, Ordering::SeqCst);
        }
        std::future::pending::<()>().await;
    };
    let advanced = &advanced;
    tokio::select! {
        () = crashed.notified() => {}
        () = story => {}
        () = tokio::time::sleep(Duration::from_secs(60)) => panic!("never reached command {k}"),
    }
    shop.crash();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A new process on the same store and clock: the clients retry what they sent.
    let backend = Backend::open(url).await.expect("reopen");
    let shop = Shop::start(backend, clock, fast(), None);
    place_orders(&shop).await.expect("place again (duplicates)");
    if !advanced.load(Ordering::SeqCst) {
        wait_settled(&shop, false).await.expect("settled after the restart");
        control.advance(fulfilment::PAYMENT_DEADLINE + Duration::from_secs(60));
    }
    let summary = wait_settled(&shop, true).await.expect("the deadline after the restart");
    shop.stop().await;
    summary
}

/// The story once without a crash, then with a crash after each command the process
/// manager sends: every time the same end state, and no command applied twice (a payment
/// taken twice, or a line reserved twice, would change it).
async fn crashes_change_nothing<F, Fut>(mut url_for: F)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = String>,
{
    let (expected, commands) = baseline(&url_for(0).await).await;
    assert!(commands >= 10, "the story sends a dozen commands ({commands})");
    for k in 0..commands {
        let summary = crash_after(&url_for(k + 1).await, k).await;
        assert_eq!(summary, expected, "after a crash after command {k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_crashing_after_any_step_changes_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().to_owned();
    crashes_change_nothing(|k| {
        let url = format!("sqlite://{}", path.join(format!("orders-{k}.db")).display());
        async move { url }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_crashing_after_any_step_changes_nothing() {
    let server = std::env::var("DATABASE_URL")
        .expect("DATABASE_URL is not set: this test needs a PostgreSQL server (scripts/test starts one)");
    let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base).to_owned();
    let names = Arc::new(std::sync::Mutex::new(Vec::new()));
    let created = Arc::clone(&names);
    crashes_change_nothing(move |_| {
        let (server, base, created) = (server.clone(), base.clone(), Arc::clone(&created));
        async move {
            let name = format!("cqrs_orders_{}", uuid::Uuid::new_v4().simple());
            let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server).await.expect("connect");
            sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin).await.expect("create");
            let url = format!("{base}/{name}");
            created.lock().expect("lock").push(name);
            url
        }
    })
    .await;
    let server = std::env::var("DATABASE_URL").expect("set");
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&server).await.expect("connect");
    let names: Vec<String> = names.lock().expect("lock").clone();
    for name in names {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projection_shows_each_order_s_status() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("orders.db").display());
    let backend = Backend::open(&url).await.expect("open");
    let (clock, control) = Clock::test();
    let shop = Shop::start(backend, clock, fast(), None);
    run_story(&shop, &control).await.expect("story");
    let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
    let expected: BTreeMap<String, (String, String)> = [
        ("order-1", "confirmed", ""),
        ("order-2", "cancelled", "out of stock: mug"),
        ("order-3", "cancelled", "payment: card declined"),
        ("order-4", "cancelled", "payment deadline passed"),
    ]
    .into_iter()
    .map(|(id, status, reason)| (id.to_owned(), (status.to_owned(), reason.to_owned())))
    .collect();
    loop {
        let projected = shop.backend.orders_by_status().await.expect("rows");
        if projected == expected {
            break;
        }
        assert!(tokio::time::Instant::now() < give_up, "projection: {projected:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shop.stop().await;
}
