//! Search, the second read model, on SQLite (FTS5) and PostgreSQL (tsvector): newest first,
//! matched words highlighted, edits and deletes followed, hostile input harmless, and a
//! rebuild from the log that gives the same results.

use std::sync::Arc;

use cqrs_core::{CommandEnvelope, EventStore, Progress, Timestamp};
use cqrs_postgres::PgEventStore;
use cqrs_sqlite::SqliteEventStore;
use livechat_app::domain::{ChatCommand, ChatId, SendMessage};
use livechat_app::search::{Backend, PgSearch, SqliteSearch, Terms, PROJECTION_NAME};

use crate::support::{fresh_database, Response, TestServer, TIMEOUT};

/// Sends `content` as `sender` in `room` at second `at` (apart, so no rate limit).
async fn say(server: &TestServer, room: &str, sender: &str, content: &str, at: i64) -> u64 {
    let command = SendMessage {
        chat_id: ChatId::parse(room).expect("room"),
        sender: sender.into(),
        content: content.into(),
        sent_at: Timestamp(at * 10_000_000),
    };
    let outcome =
        server.state.dispatcher.dispatch(CommandEnvelope::new(ChatCommand::from(command))).await.expect("sent");
    outcome.appended.expect("stored").first_version.0
}

async fn indexed(server: &TestServer) {
    let head = server.state.store.head().await.expect("head");
    server.state.progress.wait_for(PROJECTION_NAME, head, TIMEOUT).await.expect("indexed");
}

/// `(room, version)` of every result on a search page, in order.
fn results(page: &Response) -> Vec<(String, u64)> {
    page.body
        .split("<li data-search-result=\"\" data-room=\"")
        .skip(1)
        .map(|rest| {
            let (room, rest) = rest.split_once('"').expect("room");
            let version = rest.split("data-version=\"").nth(1).and_then(|v| v.split('"').next()).expect("version");
            (room.to_owned(), version.parse().expect("number"))
        })
        .collect()
}

async fn search(server: &TestServer, query: &str) -> Response {
    let page = server.get(&format!("/search?{query}"), None).await;
    assert!(page.status < 500, "{query}: {} {}", page.status, page.body);
    page
}

async fn searches_follow_the_log(server: &TestServer) {
    let pizza = say(server, "kitchen", "alice", "Pizza tonight? I bring the pizza stone", 1).await;
    say(server, "kitchen", "bob", "pasta for me", 2).await;
    let later = say(server, "kitchen", "carol", "pizza again, with <b>olives</b>", 3).await;
    let elsewhere = say(server, "garage", "dave", "pizza in the garage", 4).await;
    indexed(server).await;

    let page = search(server, "q=pizza").await;
    assert_eq!(page.status, 200);
    let everywhere = [("garage".to_owned(), elsewhere), ("kitchen".to_owned(), later), ("kitchen".to_owned(), pizza)];
    assert_eq!(results(&page), everywhere, "newest first, every room");
    assert!(page.body.contains("<mark>Pizza</mark> tonight? I bring the <mark>pizza</mark> stone"), "{}", page.body);
    assert!(page.body.contains("with &lt;b&gt;olives&lt;/b&gt;"), "text stays text");
    assert!(page.body.contains("<form id=\"search\""), "the form on the results page");
    let in_room = search(server, "q=PIZZA&room=kitchen").await;
    assert_eq!(results(&in_room), everywhere[1..]);
    assert_eq!(results(&search(server, "q=piz").await).len(), 3, "the last word is a prefix");
    assert_eq!(results(&search(server, "q=pizza+stone").await), everywhere[2..], "every word must match");

    let room = ChatId::parse("kitchen").expect("room");
    let edit = ChatCommand::EditMessage {
        chat_id: room.clone(),
        version: pizza,
        sender: "alice".into(),
        content: "burgers tonight".into(),
        mentions: vec![],
        edited_at: Timestamp(11_000_000),
    };
    let delete = ChatCommand::DeleteMessage {
        chat_id: room,
        version: later,
        sender: "carol".into(),
        deleted_at: Timestamp(31_000_000),
    };
    for command in [edit, delete] {
        server.state.dispatcher.dispatch(CommandEnvelope::new(command)).await.expect("stored");
    }
    indexed(server).await;
    assert_eq!(results(&search(server, "q=pizza").await), everywhere[..1], "edited and deleted texts are gone");
    assert_eq!(results(&search(server, "q=burgers").await), [("kitchen".to_owned(), pizza)]);
    assert!(results(&search(server, "q=olives").await).is_empty());

    for hostile in [
        "q=%22",
        "q=*",
        "q=NEAR(pizza",
        "q=pizza+OR+x",
        "q=%27",
        "q=%5C",
        "q=%3A*",
        "q=!pizza",
        "q=pizza%26garage",
        "q=pizza%7Cgarage",
        "q=(pizza)",
        "q=-pizza",
        "q=pizza%22",
        "q=%5Epizza",
        "q=body%3Apizza",
        "q=%00pizza",
        "q=pizza%27%3A*+%26+!%27x",
        "q=%E2%80%AEpizza",
    ] {
        let page = search(server, hostile).await;
        assert!(page.status == 200 || page.status == 422, "{hostile}: {}", page.status);
    }
    assert_eq!(
        results(&search(server, "q=%22pizza%22+(in)+garage*").await),
        everywhere[..1],
        "quotes, brackets, stars dropped"
    );
    assert!(results(&search(server, "q=pizza+AND+garage").await).is_empty(), "AND is a word to find, not an operator");
    assert_eq!(results(&search(server, "q=pizza+OR+pasta").await).len(), 0, "OR is a word too");
    let long = search(server, &format!("q={}", "a".repeat(201))).await;
    assert_eq!(long.status, 422);
    assert!(long.body.contains("at most 200 characters"));
    assert_eq!(search(server, "q=pizza&room=no%20such").await.status, 400);
}

/// The results of a few searches, straight from an index.
async fn answers(index: &dyn livechat_app::search::SearchIndex) -> Vec<Vec<(String, u64, String)>> {
    let mut all = Vec::new();
    for query in ["pizza", "burgers", "garage", "pasta for", "olives"] {
        let terms = Terms::parse(query).expect("terms");
        let hits = index.search(&terms, None, 50).await.expect("search");
        all.push(hits.into_iter().map(|hit| (hit.room.to_string(), hit.version, hit.snippet)).collect());
    }
    all
}

#[tokio::test]
async fn sqlite_search_is_newest_first_highlighted_follows_edits_and_rebuilds_the_same() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let store = SqliteEventStore::connect(&url).await.expect("open");
    let backend = Backend::Sqlite { url: url.clone(), store: store.clone() };
    let server = TestServer::start_searching(Arc::new(store.clone()), backend).await;
    searches_follow_the_log(&server).await;
    let live = answers(server.state.search.get().expect("search").as_ref()).await;

    let progress = Progress::new();
    let rebuilt = SqliteSearch::start_named(&url, &store, "chat-search-rebuilt", "chat_search_rebuilt", &progress)
        .await
        .expect("rebuild");
    progress.wait_for("chat-search-rebuilt", store.head().await.expect("head"), TIMEOUT).await.expect("rebuilt");
    assert_eq!(answers(rebuilt.index.as_ref()).await, live, "a rebuild from the log gives the same results");
    rebuilt.running.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn postgres_search_is_newest_first_highlighted_follows_edits_and_rebuilds_the_same() {
    let url = fresh_database().await;
    let store = PgEventStore::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    let server = TestServer::start_searching(Arc::new(store.clone()), Backend::Postgres(store.clone())).await;
    searches_follow_the_log(&server).await;
    let live = answers(server.state.search.get().expect("search").as_ref()).await;

    let progress = Progress::new();
    let rebuilt =
        PgSearch::start_named(&store, "chat-search-rebuilt", "chat_search_rebuilt", &progress).await.expect("rebuild");
    progress.wait_for("chat-search-rebuilt", store.head().await.expect("head"), TIMEOUT).await.expect("rebuilt");
    assert_eq!(answers(rebuilt.index.as_ref()).await, live, "a rebuild from the log gives the same results");
    rebuilt.running.stop().await;
    server.stop().await;
}

/// One address may search only so often: past its burst, 429 with the wait in words, and
/// nothing searched; an empty query costs nothing.
#[tokio::test]
async fn searches_past_the_address_budget_are_refused_with_429() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let store = SqliteEventStore::connect(&url).await.expect("open");
    let backend = Backend::Sqlite { url: url.clone(), store: store.clone() };
    let mut config = livechat_app::AppConfig::default();
    config.limits.searches_burst = 3;
    config.limits.searches_per_second = 0.01;
    let server = TestServer::start_searching_with(Arc::new(store.clone()), backend, config).await;
    say(&server, "kitchen", "alice", "pizza tonight", 1).await;
    indexed(&server).await;
    for _ in 0..3 {
        let page = server.get("/search?q=pizza", None).await;
        assert_eq!(page.status, 200, "{}", page.body);
        assert_eq!(results(&page).len(), 1);
    }
    let refused = server.get("/search?q=pizza", None).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(refused.body.contains("too many searches"), "{}", refused.body);
    let metrics = server.get("/metrics", None).await;
    assert!(metrics.body.contains("livechat_limited_total{limit=\"address_searches\"} 1"), "{}", metrics.body);
    let empty = server.get("/search?q=", None).await;
    assert_eq!(empty.status, 200, "an empty query searches nothing and is not counted");
    server.stop().await;
}

/// Every hit of `word` in the index `/search` reads (no page limit).
async fn hits_of(server: &TestServer, word: &str) -> Vec<(String, u64)> {
    let terms = Terms::parse(word).expect("terms");
    let index = server.state.search.get().expect("search");
    let hits = index.search(&terms, None, 1_000_000).await.expect("search");
    hits.into_iter().map(|hit| (hit.room.to_string(), hit.version)).collect()
}

/// Rebuilds the search index from the console (`/admin/rebuilds`) while people chat: version 2
/// is built beside, the switch waits for it, readers never see fewer results than before, and
/// the new index equals a fresh build.
async fn a_rebuild_from_the_console_while_people_chat(
    server: TestServer,
    fresh: impl std::future::Future<Output = Vec<(String, u64)>>,
) {
    for n in 0..150 {
        say(&server, &format!("room-{}", n % 5), "alice", &format!("pizza number {n}"), n).await;
    }
    indexed(&server).await;
    let server = Arc::new(server);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn({
        let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
        async move {
            let mut n = 1_000;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                say(&server, "room-9", "bob", &format!("more pizza {n}"), n).await;
                n += 1;
                tokio::time::sleep(std::time::Duration::from_millis(3)).await;
            }
        }
    });
    let reader = tokio::spawn({
        let (server, stop) = (Arc::clone(&server), Arc::clone(&stop));
        async move {
            let (mut last, mut reads, mut shrinks) = (0usize, 0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let seen = hits_of(&server, "pizza").await.len();
                if seen < last {
                    shrinks.push((last, seen));
                }
                (last, reads) = (seen, reads + 1);
            }
            (reads, shrinks)
        }
    });

    let built = server.admin_post("/admin/rebuilds/chat-search/build", "", "").await;
    assert_eq!(built.status, 303, "{}", built.body);
    let page = server.admin_get("/admin/rebuilds?live=0").await;
    assert!(
        page.body.contains("data-projection=\"chat-search\" data-version=\"2\" data-role=\"building\""),
        "{}",
        page.body
    );
    let switched = server.admin_post("/admin/rebuilds/chat-search/switch", "version=2", "").await;
    assert_eq!(switched.status, 303, "{}", switched.body);
    let page = server.admin_get("/admin/rebuilds?live=0").await;
    assert!(page.body.contains("data-version=\"2\" data-role=\"live\""), "{}", page.body);
    assert!(page.body.contains("data-version=\"1\" data-role=\"kept\""), "{}", page.body);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.await.expect("writer");
    let (reads, shrinks) = reader.await.expect("reader");
    assert!(reads >= 10, "the reader searched throughout ({reads} searches)");
    assert!(shrinks.is_empty(), "a search saw fewer results than the one before: {shrinks:?}");

    let head = server.state.store.head().await.expect("head");
    server.state.progress.wait_for("chat-search@v2", head, TIMEOUT).await.expect("v2 current");
    let served = hits_of(&server, "pizza").await;
    assert!(served.len() > 150, "the writes during the rebuild are in: {}", served.len());
    assert_eq!(served, fresh.await, "version 2 equals a fresh build from the log");
    let dropped = server.admin_post("/admin/rebuilds/chat-search/drop", "version=1", "").await;
    assert_eq!(dropped.status, 303, "{}", dropped.body);
    assert_eq!(hits_of(&server, "pizza").await, served, "dropping the old version leaves the served one");
    match Arc::try_unwrap(server) {
        Ok(server) => server.stop().await,
        Err(_) => panic!("the server is still shared"),
    }
}

/// Every hit of "pizza" in a fresh build named `name` over `start`.
async fn fresh_hits(
    search: livechat_app::search::Search,
    progress: &Progress,
    head: cqrs_core::Position,
) -> Vec<(String, u64)> {
    progress.wait_for(search.running.name(), head, TIMEOUT).await.expect("fresh build");
    let terms = Terms::parse("pizza").expect("terms");
    let hits = search.index.search(&terms, None, 1_000_000).await.expect("search");
    search.running.stop().await;
    hits.into_iter().map(|hit| (hit.room.to_string(), hit.version)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_search_is_rebuilt_from_the_console_while_people_chat() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let store = SqliteEventStore::connect(&url).await.expect("open");
    let backend = Backend::Sqlite { url: url.clone(), store: store.clone() };
    let server = TestServer::start_searching(Arc::new(store.clone()), backend).await;
    let fresh = async move {
        let progress = Progress::new();
        let head = store.head().await.expect("head");
        let search = SqliteSearch::start_named(&url, &store, "fresh", "fresh", &progress).await.expect("fresh");
        fresh_hits(search, &progress, head).await
    };
    a_rebuild_from_the_console_while_people_chat(server, fresh).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_search_is_rebuilt_from_the_console_while_people_chat() {
    let url = fresh_database().await;
    let store = PgEventStore::connect(&url).await.expect("connect");
    store.migrate().await.expect("migrate");
    let server = TestServer::start_searching(Arc::new(store.clone()), Backend::Postgres(store.clone())).await;
    let fresh = async move {
        let progress = Progress::new();
        let head = store.head().await.expect("head");
        let search = PgSearch::start_named(&store, "fresh", "fresh", &progress).await.expect("fresh");
        fresh_hits(search, &progress, head).await
    };
    a_rebuild_from_the_console_while_people_chat(server, fresh).await;
}
