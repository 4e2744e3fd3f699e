//! End-to-end tests in headless Chromium, driven over WebDriver (Debian's `chromium` and
//! `chromium-driver`; `scripts/test` installs them when missing). Each user has a browser of
//! their own (separate profiles, so separate cookies).
//!
//! - two users in one room: live delivery (with the end-to-end time, keypress in one browser to
//!   the message in the other's DOM), Enter and Shift-Enter, XSS payloads shown as text, the
//!   draft and focus kept while messages arrive, a socket dropped while the other user sends
//!   (every message shown once, in order, after the reconnect);
//! - search (SQLite): live results as one types, hostile input, a result opening its message,
//!   an edit and a delete followed;
//! - with PostgreSQL: two app processes on one database, one user on each; presence and typing
//!   across them, and a killed process's people dropped within the bound;
//! - typing, editing (a focused field, Escape cancels, Enter saves, an "edited" mark), deleting
//!   ("message deleted" for everyone), links (http/https only, safe `rel`), mentions and the
//!   unread count in a hidden tab's title, across two browsers;
//! - an append stored but answered "unavailable" twice (a store fault): the client shows it is
//!   retrying, resends the same id, and both browsers end with exactly one message.

#[path = "it/support.rs"]
#[allow(dead_code)]
mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};
use tokio::process::{Child, Command};

use support::{fresh_database, AppProcess, TestServer};

const WAIT: Duration = Duration::from_secs(15);
const ENTER: &str = "\u{E007}";
const SHIFT: &str = "\u{E008}";
/// Releases held modifier keys.
const RELEASE: &str = "\u{E000}";

fn find_binary(env: &str, candidates: &[&str]) -> String {
    if let Ok(path) = std::env::var(env) {
        return path;
    }
    for candidate in candidates {
        if std::path::Path::new(candidate).exists() {
            return (*candidate).to_owned();
        }
    }
    panic!(
        "{} not found (set {env}); install Debian's chromium and chromium-driver packages, \
         or run ./scripts/test, which installs them",
        candidates[0]
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A chromedriver process, killed on drop.
struct Driver {
    _child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Self {
        let binary = find_binary("CHROMEDRIVER", &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]);
        let port = free_port();
        let child = Command::new(binary)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(started.elapsed() < WAIT, "chromedriver did not start listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self { _child: child, url: format!("http://127.0.0.1:{port}") }
    }

    /// A new browser with its own profile.
    async fn browser(&self) -> Client {
        let chromium = find_binary("CHROMIUM", &["/usr/bin/chromium", "/usr/bin/chromium-browser"]);
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--no-first-run",
                         "--disable-dev-shm-usage", "--window-size=1000,700"],
            }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        ClientBuilder::new(connector).capabilities(capabilities).connect(&self.url).await.expect("browser session")
    }
}

async fn eval(browser: &Client, script: &str) -> Value {
    browser.execute(script, vec![]).await.expect("script runs")
}

/// Polls `predicate` (a JS expression) until it is true.
async fn wait_for(browser: &Client, what: &str, predicate: &str) {
    let script = format!("return !!({predicate});");
    let started = Instant::now();
    loop {
        if eval(browser, &script).await == Value::Bool(true) {
            return;
        }
        assert!(started.elapsed() < WAIT, "timed out waiting for {what} ({predicate})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Joins `room` as `name` through the lobby's form and waits for the live connection.
async fn join(browser: &Client, base: &str, name: &str, room: &str) {
    browser.goto(&format!("{base}/")).await.expect("open lobby");
    browser
        .find(Locator::Css("form#join input[name=name]"))
        .await
        .expect("name input")
        .send_keys(name)
        .await
        .expect("type");
    browser
        .find(Locator::Css("form#join input[name=room]"))
        .await
        .expect("room input")
        .send_keys(room)
        .await
        .expect("type");
    browser.find(Locator::Css("form#join button[type=submit]")).await.expect("button").click().await.expect("submit");
    wait_for(browser, "the room page", &format!("location.pathname === '/{room}'")).await;
    wait_for(browser, "the live connection", "document.body.dataset.live === 'connected'").await;
}

/// Every message on the page: `[position, sender, body text]`.
async fn messages(browser: &Client) -> Vec<(u64, String, String)> {
    let value = eval(
        browser,
        "return [...document.querySelectorAll('#messages li.msg')].map(li => \
           [Number(li.dataset.pos), li.querySelector('.sender').textContent, li.querySelector('.body').textContent]);",
    )
    .await;
    serde_json::from_value(value).expect("message list")
}

/// Types `text` into the composer (with `keys` after it) and waits for the acknowledgement.
async fn send(browser: &Client, text: &str) {
    let composer = browser.find(Locator::Css("form#send textarea[name=message]")).await.expect("composer");
    composer.send_keys(&format!("{text}{ENTER}")).await.expect("type and send");
    wait_for(browser, "the acknowledgement", "document.querySelector('#send textarea').value === '' && document.querySelector('#send button').textContent === 'Send'").await;
}

async fn shows(browser: &Client, body: &str) -> bool {
    messages(browser).await.iter().any(|(_, _, text)| text == body)
}

async fn wait_shows(browser: &Client, body: &str) {
    let started = Instant::now();
    while !shows(browser, body).await {
        assert!(started.elapsed() < WAIT, "{body:?} never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_once_in_order(list: &[(u64, String, String)]) {
    let positions: Vec<u64> = list.iter().map(|(pos, _, _)| *pos).collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "positions in order, no duplicates: {positions:?}");
}

/// Delivery time: Enter pressed in `alice`'s browser → the message in `bob`'s DOM, for four
/// messages (ms, unsorted). Both browsers run on this machine, so their clocks are the same clock.
async fn delivery_times(alice: &Client, bob: &Client) -> Vec<f64> {
    eval(
        alice,
        "window.__sentAt = {}; const t = document.querySelector('#send textarea'); \
        t.addEventListener('keydown', e => { if (e.key === 'Enter' && !e.shiftKey) \
        window.__sentAt[t.value] = performance.timeOrigin + performance.now(); }, true); return 1;",
    )
    .await;
    eval(bob, "window.__seen = {}; new MutationObserver(records => { for (const r of records) \
        for (const n of r.addedNodes) if (n.querySelector) window.__seen[n.querySelector('.body').textContent] = \
        performance.timeOrigin + performance.now(); }).observe(document.getElementById('messages'), {childList: true}); return 1;").await;
    let mut latencies = Vec::new();
    for i in 0..4 {
        let text = format!("timing message {i}");
        send(alice, &text).await;
        wait_shows(bob, &text).await;
        let sent = eval(alice, &format!("return window.__sentAt['{text}'];")).await.as_f64().expect("sent time");
        let seen = eval(bob, &format!("return window.__seen['{text}'];")).await.as_f64().expect("seen time");
        latencies.push(seen - sent);
    }
    latencies
}

/// Shift-Enter adds a line; Enter sends.
async fn shift_enter_adds_a_line(bob: &Client, alice: &Client) {
    let composer = bob.find(Locator::Css("form#send textarea[name=message]")).await.expect("composer");
    composer.send_keys(&format!("line one{SHIFT}{ENTER}{RELEASE}line two")).await.expect("type");
    assert_eq!(eval(bob, "return document.querySelector('#send textarea').value;").await, "line one\nline two");
    assert!(!shows(alice, "line one\nline two").await, "Shift-Enter did not send");
    composer.send_keys(ENTER).await.expect("send");
    wait_shows(alice, "line one\nline two").await;
}

/// Markup in messages is shown as text and never runs.
async fn markup_is_shown_as_text(bob: &Client, alice: &Client) {
    let payloads = ["<img src=x onerror=\"window.__xss = 1\">", "<script>window.__xss = 2</script>"];
    for payload in payloads {
        send(bob, payload).await;
        wait_shows(alice, payload).await;
    }
    assert_eq!(
        eval(
            alice,
            "return [window.__xss === undefined, document.querySelectorAll('#messages img, #messages script').length];"
        )
        .await,
        json!([true, 0])
    );
}

/// A draft being typed keeps its text and focus while messages arrive.
async fn a_draft_survives_arriving_messages(alice: &Client, bob: &Client) {
    alice
        .find(Locator::Css("form#send textarea"))
        .await
        .expect("composer")
        .send_keys("draft in progress")
        .await
        .expect("type");
    send(bob, "arrives while alice types").await;
    wait_shows(alice, "arrives while alice types").await;
    assert_eq!(
        eval(
            alice,
            "const t = document.querySelector('#send textarea'); return [t.value, document.activeElement === t];"
        )
        .await,
        json!(["draft in progress", true])
    );
    eval(alice, "document.querySelector('#send textarea').value = ''; return 1;").await;
}

/// Bob's socket goes down while alice sends; after the reconnect every message is there once.
/// A dropped connection (as by the network) reconnects by itself and misses nothing. The first
/// send waits until 5.1 s after `rate_window_started` (the room's rate limit window).
async fn reconnects_miss_nothing(alice: &Client, bob: &Client, rate_window_started: Instant) {
    tokio::time::sleep(Duration::from_millis(5_100).saturating_sub(rate_window_started.elapsed())).await;
    eval(bob, "window.liveSocket.disconnect(); return 1;").await;
    wait_for(bob, "disconnected state", "document.body.dataset.live === 'disconnected'").await;
    for i in 0..3 {
        send(alice, &format!("while bob was away {i}")).await;
    }
    assert!(!shows(bob, "while bob was away 0").await);
    eval(bob, "window.liveSocket.connect(); return 1;").await;
    wait_for(bob, "reconnected", "document.body.dataset.live === 'connected'").await;
    wait_shows(bob, "while bob was away 2").await;

    // A dropped connection (as by the network) reconnects by itself and misses nothing.
    eval(bob, "window.liveSocket.drop(); return 1;").await;
    send(alice, "right after the drop").await;
    wait_shows(bob, "right after the drop").await;
    wait_for(bob, "reconnected", "document.body.dataset.live === 'connected'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_chat_live_in_separate_browsers() {
    let server = TestServer::start().await;
    let base = format!("http://{}", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    let bob = driver.browser().await;
    join(&alice, &base, "alice", "e2e").await;
    join(&bob, &base, "bob", "e2e").await;
    wait_for(&bob, "alice in presence", "document.querySelector('#presence').textContent.includes('alice')").await;

    let mut latencies = delivery_times(&alice, &bob).await;
    let rate_window_started = Instant::now();
    latencies.sort_by(f64::total_cmp);
    println!("end-to-end delivery, Enter in one browser to the DOM of the other (ms): {latencies:.1?}");
    assert!(latencies.iter().all(|&ms| ms > 0.0 && ms < 5_000.0), "{latencies:?}");

    shift_enter_adds_a_line(&bob, &alice).await;
    markup_is_shown_as_text(&bob, &alice).await;
    a_draft_survives_arriving_messages(&alice, &bob).await;
    reconnects_miss_nothing(&alice, &bob, rate_window_started).await;

    let seen_by_alice = messages(&alice).await;
    let seen_by_bob = messages(&bob).await;
    assert_once_in_order(&seen_by_bob);
    assert_eq!(seen_by_alice, seen_by_bob, "both browsers show the same messages, once each, in order");
    assert_eq!(seen_by_bob.len(), 4 + 1 + 2 + 1 + 3 + 1);

    alice.close().await.expect("close");
    bob.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_app_processes_on_one_postgres_database_are_one_chat() {
    let database = fresh_database().await;
    let first = AppProcess::start(&database).await;
    let second = AppProcess::start(&database).await;
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    let bob = driver.browser().await;
    join(&alice, &first.base, "alice", "cluster").await;
    join(&bob, &second.base, "bob", "cluster").await;
    send(&alice, "from the first process").await;
    wait_shows(&bob, "from the first process").await;
    send(&bob, "from the second process").await;
    wait_shows(&alice, "from the second process").await;
    let seen_by_alice = messages(&alice).await;
    assert_once_in_order(&seen_by_alice);
    assert_eq!(seen_by_alice, messages(&bob).await);

    // A restarted process rebuilds the room from the database.
    drop(first);
    let restarted = AppProcess::start(&database).await;
    alice.goto(&format!("{}/cluster", restarted.base)).await.expect("reload");
    wait_for(&alice, "the live connection", "document.body.dataset.live === 'connected'").await;
    assert_eq!(messages(&alice).await, seen_by_alice, "history survives a restart");

    alice.close().await.expect("close");
    bob.close().await.expect("close");
}

/// The names in the page's presence list and its count.
async fn presence(browser: &Client) -> (Vec<String>, String) {
    let value = eval(
        browser,
        "return [[...document.querySelectorAll('#presence [data-name]')].map(li => li.dataset.name), \
         document.getElementById('presence-count').textContent];",
    )
    .await;
    serde_json::from_value(value).expect("presence")
}

async fn wait_presence(browser: &Client, names: &[&str]) -> Duration {
    let started = Instant::now();
    loop {
        let (shown, count) = presence(browser).await;
        if shown == names && count == names.len().to_string() {
            return started.elapsed();
        }
        assert!(started.elapsed() < WAIT, "presence {shown:?} ({count}) never became {names:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_are_one_across_nodes_and_a_killed_node_drops_its_people() {
    let database = fresh_database().await;
    let first = AppProcess::start(&database).await;
    let mut second = AppProcess::start(&database).await;
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    let bob = driver.browser().await;
    join(&alice, &first.base, "alice", "nodes").await;
    join(&bob, &second.base, "bob", "nodes").await;
    for browser in [&alice, &bob] {
        let took = wait_presence(browser, &["alice", "bob"]).await;
        assert!(took < Duration::from_secs(1), "seen across nodes in {took:?}");
    }

    // Typing on one node is shown on the other, and ends with the message.
    let composer = alice.find(Locator::Css("form#send textarea[name=message]")).await.expect("composer");
    let typed = Instant::now();
    composer.send_keys("across the nodes").await.expect("type");
    wait_for(&bob, "alice typing", "document.querySelector('#typing').textContent === 'alice is typing…'").await;
    assert!(typed.elapsed() < Duration::from_secs(1), "typing seen across nodes in {:?}", typed.elapsed());
    composer.send_keys(ENTER).await.expect("send");
    wait_shows(&bob, "across the nodes").await;
    wait_for(&bob, "typing cleared", "document.querySelector('#typing').textContent === ''").await;

    // Leaving on one node is seen on the other at once.
    bob.goto(&format!("{}/", second.base)).await.expect("leave");
    assert!(wait_presence(&alice, &["alice"]).await < Duration::from_secs(1));
    bob.goto(&format!("{}/nodes", second.base)).await.expect("come back");
    wait_for(&bob, "the live connection", "document.body.dataset.live === 'connected'").await;
    wait_presence(&alice, &["alice", "bob"]).await;

    // A node killed without a word: its people leave everyone's list within the bound.
    second.child.start_kill().expect("SIGKILL");
    let killed = Instant::now();
    wait_presence(&alice, &["alice"]).await;
    let gone = killed.elapsed();
    assert!(gone <= livechat_app::cluster::DEAD_NODE_BOUND + Duration::from_millis(500), "dropped after {gone:?}");
    assert!(gone <= Duration::from_secs(10));

    alice.close().await.expect("close");
    bob.close().await.expect("close");
    drop(first);
}

/// Types `query` into the room's search field (replacing what is there) and waits until the
/// live results show `count` results.
async fn search_live(browser: &Client, query: &str, count: usize) -> Vec<(String, String)> {
    let field = browser.find(Locator::Css("form#search input[name=q]")).await.expect("search field");
    field.clear().await.expect("clear");
    // No stale results: the panel fills again only with the answer to this query.
    eval(browser, "document.getElementById('search-panel').replaceChildren(); return 1;").await;
    field.send_keys(query).await.expect("type");
    wait_for(
        browser,
        &format!("{count} results for {query:?}"),
        &format!(
            "document.querySelector('#search-panel #search-results') && \
             document.querySelectorAll('#search-panel [data-search-result]').length === {count}"
        ),
    )
    .await;
    let value = eval(
        browser,
        "return [...document.querySelectorAll('#search-panel [data-search-result]')].map(li => \
         [li.dataset.room + '/' + li.dataset.version, li.querySelector('.body').innerHTML]);",
    )
    .await;
    serde_json::from_value(value).expect("results")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_shows_live_results_opens_the_message_and_follows_edits_and_deletes() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let store = cqrs_sqlite::SqliteEventStore::connect(&url).await.expect("open");
    let backend = livechat_app::search::Backend::Sqlite { url, store: store.clone() };
    let server = TestServer::start_searching(std::sync::Arc::new(store), backend).await;
    let base = format!("http://{}", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    join(&alice, &base, "alice", "food").await;
    send(&alice, "pizza tonight at eight").await;
    send(&alice, "or pasta").await;
    for i in 0..3 {
        send(&alice, &format!("filler {i}")).await;
    }
    let found = search_live(&alice, "pizza", 1).await;
    assert_eq!(found[0].0, "food/1");
    assert_eq!(found[0].1, "<mark>pizza</mark> tonight at eight");
    // Query syntax typed in is words: these need "near" and "or" too, which no message has.
    search_live(&alice, "\"*NEAR( pizza) OR:", 0).await;
    search_live(&alice, "\"*():", 0).await;
    search_live(&alice, "\"pizza\" tonight*", 1).await;

    // A result opens the room at the message, highlighted.
    alice
        .find(Locator::Css("#search-panel [data-search-result] a"))
        .await
        .expect("result")
        .click()
        .await
        .expect("open");
    wait_for(&alice, "the message page", "location.search.includes('before=') && location.hash.startsWith('#m-')")
        .await;
    wait_for(
        &alice,
        "the highlighted message",
        "document.querySelector('li.msg:target .body').textContent === 'pizza tonight at eight'",
    )
    .await;

    // An edit updates the match; a delete removes it.
    alice.goto(&format!("{base}/food")).await.expect("back to the room");
    wait_for(&alice, "the live connection", "document.body.dataset.live === 'connected'").await;
    click_in_message(&alice, "pizza tonight at eight", "[data-action=edit]").await;
    let field = alice.find(Locator::Css("textarea.edit")).await.expect("edit field");
    field.clear().await.expect("clear");
    field.send_keys(&format!("burgers tonight{ENTER}")).await.expect("save");
    wait_shows(&alice, "burgers tonight").await;
    search_live(&alice, "burgers", 1).await;
    search_live(&alice, "pizza", 0).await;
    click_in_message(&alice, "burgers tonight", "[data-action=delete]").await;
    wait_for(&alice, "the tombstone", "document.querySelector('#messages li.msg[data-deleted]') !== null").await;
    search_live(&alice, "burgers", 0).await;
    assert_eq!(search_live(&alice, "pasta", 1).await[0].0, "food/2");
    alice.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrolling_up_loads_older_messages_and_only_a_reader_at_the_bottom_follows_new_ones() {
    use cqrs_core::{CommandEnvelope, Position, Timestamp};
    use livechat_app::domain::{ChatCommand, ChatId, SendMessage};

    let server = TestServer::start().await;
    let mut last = 0;
    for i in 0..250 {
        let command = SendMessage {
            chat_id: ChatId::parse("history").expect("room"),
            sender: "archivist".into(),
            content: format!("old message {i}"),
            sent_at: Timestamp(i * 2_000_000),
        };
        let outcome =
            server.state.dispatcher.dispatch(CommandEnvelope::new(ChatCommand::from(command))).await.expect("seed");
        last = outcome.appended.expect("stored").last_position.0;
    }
    server.state.progress.wait_for("chat-read-model", Position(last), WAIT).await.expect("projected");
    let base = format!("http://{}", server.addr);
    let driver = Driver::start().await;
    let carol = driver.browser().await;
    join(&carol, &base, "carol", "history").await;
    assert_eq!(messages(&carol).await.len(), 100, "the page starts with the latest 100");
    let at_bottom = "(() => { const l = document.getElementById('messages'); \
        return l.scrollHeight - l.scrollTop - l.clientHeight < 40; })()";
    wait_for(&carol, "the log starts at the bottom", at_bottom).await;

    // Scrolling to the top loads the previous page, keeping the visible messages in place.
    eval(&carol, "document.getElementById('messages').scrollTop = 0; return 1;").await;
    wait_for(&carol, "older messages", "document.querySelectorAll('#messages li.msg').length === 200").await;
    assert!(
        eval(&carol, "return document.getElementById('messages').scrollTop;").await.as_f64().expect("number") > 0.0
    );
    let list = messages(&carol).await;
    assert_once_in_order(&list);
    assert_eq!(list.first().map(|m| m.2.as_str()), Some("old message 50"));

    // Reading history: a new message does not pull the reader down.
    let (mut dave, _) = server.join("dave", "history", last).await;
    let before = eval(&carol, "return document.getElementById('messages').scrollTop;").await;
    dave.send_message(1, uuid::Uuid::new_v4(), "new while carol reads history").await;
    wait_shows(&carol, "new while carol reads history").await;
    assert_eq!(eval(&carol, "return document.getElementById('messages').scrollTop;").await, before);

    // At the bottom: new messages scroll into view.
    eval(&carol, "const l = document.getElementById('messages'); l.scrollTop = l.scrollHeight; return 1;").await;
    wait_for(&carol, "at the bottom", at_bottom).await;
    dave.send_message(2, uuid::Uuid::new_v4(), "new while carol follows").await;
    wait_shows(&carol, "new while carol follows").await;
    wait_for(&carol, "still at the bottom", at_bottom).await;

    carol.close().await.expect("close");
    server.stop().await;
}

/// Clicks the element `css` inside the message whose body is `body` (by script: the controls
/// are small and may be covered).
async fn click_in_message(browser: &Client, body: &str, css: &str) {
    let script = format!(
        "const li = [...document.querySelectorAll('#messages li.msg')].find(li => li.querySelector('.body') && \
         li.querySelector('.body').textContent === {body}); if (!li) return false; \
         const el = li.querySelector({css}); if (!el) return false; el.click(); return true;",
        body = serde_json::to_string(body).expect("json"),
        css = serde_json::to_string(css).expect("json"),
    );
    assert_eq!(eval(browser, &script).await, Value::Bool(true), "no {css} in the message {body:?}");
}

/// Typing: shown to the other, gone when the message is sent.
async fn typing_is_shown_to_the_other(alice: &Client, bob: &Client) {
    let composer = alice.find(Locator::Css("form#send textarea[name=message]")).await.expect("composer");
    composer.send_keys("typo in this mesage").await.expect("type");
    wait_for(bob, "alice typing", "document.querySelector('[data-typing]').textContent === 'alice is typing…'").await;
    assert_eq!(
        eval(alice, "return document.querySelector('[data-typing]').textContent;").await,
        "",
        "not shown to herself"
    );
    composer.send_keys(ENTER).await.expect("send");
    wait_shows(bob, "typo in this mesage").await;
    wait_for(bob, "typing cleared", "document.querySelector('[data-typing]').textContent === ''").await;
}

/// Own messages carry the controls; others' do not. Edit: the text in a focused field; Escape
/// cancels, Enter saves, and the other sees an "edited" mark.
async fn only_the_sender_edits(alice: &Client, bob: &Client) {
    assert_eq!(
        eval(bob, "return document.querySelectorAll('#messages [data-action]').length;").await,
        json!(0),
        "bob has no controls on alice's message"
    );
    // Edit: the text in a focused field; Escape cancels, Enter saves.
    click_in_message(alice, "typo in this mesage", "[data-action=edit]").await;
    wait_for(alice, "the edit field", "document.activeElement && document.activeElement.matches('textarea.edit')")
        .await;
    assert_eq!(eval(alice, "return document.activeElement.value;").await, "typo in this mesage");
    let field = alice.find(Locator::Css("textarea.edit")).await.expect("edit field");
    field.send_keys(" never mind\u{E00C}").await.expect("escape");
    wait_for(alice, "edit cancelled", "!document.querySelector('textarea.edit')").await;
    click_in_message(alice, "typo in this mesage", "[data-action=edit]").await;
    let field = alice.find(Locator::Css("textarea.edit")).await.expect("edit field");
    field.clear().await.expect("clear");
    field.send_keys(&format!("no typo in this message{ENTER}")).await.expect("save");
    wait_shows(bob, "no typo in this message").await;
    assert!(!shows(bob, "typo in this mesage").await);
    wait_for(
        bob,
        "the edited mark",
        "[...document.querySelectorAll('#messages li.msg[data-edited] .edited')].length === 1",
    )
    .await;
}

/// Links: only http(s), with the safe rel and a new tab; a mention of alice is marked for her.
async fn links_and_mentions(alice: &Client, bob: &Client) {
    send(bob, "@alice docs at https://example.com/docs, not javascript:alert(1)").await;
    wait_for(
        alice,
        "the link",
        "document.querySelector('#messages a[href=\"https://example.com/docs\"][rel=\"noopener noreferrer nofollow ugc\"][target=_blank]')",
    )
    .await;
    assert_eq!(
        eval(alice, "return document.querySelectorAll('#messages a[href^=\"javascript\"]').length;").await,
        json!(0)
    );
    wait_for(
        alice,
        "the mention mark",
        "document.querySelector('#messages li.msg.mentions-me .mention[data-name=alice]')",
    )
    .await;
    assert_eq!(eval(bob, "return document.querySelectorAll('#messages li.mentions-me').length;").await, json!(0));
}

/// The count shown for `emoji` under the message `version`, as the page has it ("" at zero).
async fn reaction_count(browser: &Client, version: &str, emoji: &str) -> Value {
    let script = format!(
        "const c = document.querySelector('#messages li[data-version=\"{version}\"] [data-reaction=\"{emoji}\"]'); \
         return c ? c.textContent : null;"
    );
    eval(browser, &script).await
}

async fn wait_reaction_count(browser: &Client, version: &str, emoji: &str, expected: &str) {
    let started = Instant::now();
    while reaction_count(browser, version, emoji).await != json!(expected) {
        assert!(started.elapsed() < WAIT, "the {emoji} count of message {version} never became {expected:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reactions: a click adds one's own (shown pressed), the other sees the count live, a second
/// click takes it back; one of each per person; the count survives a reload.
async fn reactions_between_two_browsers(alice: &Client, bob: &Client) {
    let version = eval(
        alice,
        "const li = [...document.querySelectorAll('#messages li.msg')].find(li => \
         li.querySelector('.body').textContent === 'no typo in this message'); return li.dataset.version;",
    )
    .await;
    let version = version.as_str().expect("a version").to_owned();
    let button = format!("#messages li[data-version=\"{version}\"] button[data-react=\"👍\"]");
    let click = |browser: &Client| {
        let (browser, button) = (browser.clone(), button.clone());
        async move { browser.find(Locator::Css(&button)).await.expect("the 👍 button").click().await.expect("click") }
    };
    click(bob).await;
    wait_reaction_count(alice, &version, "👍", "1").await;
    wait_for(
        bob,
        "bob's own reaction pressed",
        &format!("document.querySelector('{button}').getAttribute('aria-pressed') === 'true'"),
    )
    .await;
    assert_eq!(
        eval(alice, &format!("return document.querySelector('{button}').getAttribute('aria-pressed');")).await,
        "false"
    );
    assert_eq!(eval(alice, &format!("return document.querySelector('{button}').title;")).await, "bob");
    click(alice).await;
    wait_reaction_count(bob, &version, "👍", "2").await;
    wait_for(alice, "the button enabled again", &format!("!document.querySelector('{button}').disabled")).await;
    click(bob).await;
    wait_reaction_count(alice, &version, "👍", "1").await;
    wait_reaction_count(bob, &version, "👍", "1").await;
    assert_eq!(eval(bob, &format!("return document.querySelector('{button}').title;")).await, "alice");
    bob.refresh().await.expect("reload");
    wait_for(bob, "the live connection", "document.body.dataset.live === 'connected'").await;
    wait_reaction_count(bob, &version, "👍", "1").await;
    assert_eq!(reaction_count(bob, &version, "🎉").await, "", "no count at zero");
}

/// Delete: "message deleted" for everyone, the text gone (after a reload too).
async fn a_deleted_message_leaves_a_tombstone(alice: &Client, bob: &Client) {
    click_in_message(alice, "no typo in this message", "[data-action=delete]").await;
    wait_for(bob, "the tombstone", "document.querySelector('#messages li.msg[data-deleted]') !== null").await;
    assert!(!shows(bob, "no typo in this message").await);
    assert_eq!(
        eval(bob, "return document.querySelectorAll('#messages li.msg[data-deleted] [data-react]').length;").await,
        json!(0),
        "the reactions went with the text"
    );
    assert_eq!(
        eval(bob, "return document.querySelector('#messages li.msg[data-deleted] .body').textContent;").await,
        "message deleted"
    );
    bob.refresh().await.expect("reload");
    wait_for(bob, "the live connection", "document.body.dataset.live === 'connected'").await;
    assert!(!eval(bob, "return document.body.innerHTML;")
        .await
        .as_str()
        .expect("html")
        .contains("no typo in this message"));
}

/// Unread: while bob's tab is hidden, new messages count in its title.
async fn unread_messages_count_in_a_hidden_tab_title(alice: &Client, bob: &Client) {
    eval(
        bob,
        "window.__titles = []; new MutationObserver(() => window.__titles.push(document.title)) \
         .observe(document.querySelector('title'), {childList: true, characterData: true, subtree: true}); return 1;",
    )
    .await;
    let room_tab = bob.window().await.expect("window");
    let other = bob.new_window(true).await.expect("new tab");
    bob.switch_to_window(other.handle).await.expect("switch");
    send(alice, "while bob looks elsewhere 1").await;
    send(alice, "while bob looks elsewhere 2").await;
    bob.switch_to_window(room_tab).await.expect("switch back");
    wait_shows(bob, "while bob looks elsewhere 2").await;
    let titles = eval(bob, "return window.__titles;").await;
    assert!(titles.as_array().expect("titles").iter().any(|t| t == "(2) #features · Live chat"), "{titles}");
    wait_for(bob, "the title cleared", "document.title === '#features · Live chat'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_delete_typing_links_mentions_and_unread_across_two_browsers() {
    let server = TestServer::start().await;
    let base = format!("http://{}", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    let bob = driver.browser().await;
    join(&alice, &base, "alice", "features").await;
    join(&bob, &base, "bob", "features").await;

    typing_is_shown_to_the_other(&alice, &bob).await;
    only_the_sender_edits(&alice, &bob).await;
    links_and_mentions(&alice, &bob).await;
    reactions_between_two_browsers(&alice, &bob).await;
    a_deleted_message_leaves_a_tombstone(&alice, &bob).await;
    unread_messages_count_in_a_hidden_tab_title(&alice, &bob).await;

    alice.close().await.expect("close");
    bob.close().await.expect("close");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_outcome_is_retried_with_the_same_id_and_ends_with_exactly_one_message() {
    let store = support::FaultyStore::new();
    let server = TestServer::start_with(store.clone(), livechat_app::AppConfig::default()).await;
    let base = format!("http://{}", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    let bob = driver.browser().await;
    join(&alice, &base, "alice", "faults").await;
    join(&bob, &base, "bob", "faults").await;
    eval(
        &alice,
        "window.__notes = []; new MutationObserver(() => window.__notes.push(document.getElementById('composer-error').textContent)) \
         .observe(document.getElementById('composer-error'), {childList: true, characterData: true, subtree: true}); return 1;",
    )
    .await;
    // The append is stored, and both it and the server's own retry are answered "unavailable".
    store.fail_next_appends(2);
    send(&alice, "exactly once").await;
    let notes = eval(&alice, "return window.__notes;").await;
    assert!(
        notes.as_array().expect("notes").iter().any(|n| n.as_str().is_some_and(|n| n.contains("retrying"))),
        "{notes}"
    );
    send(&alice, "and the next one").await;
    wait_shows(&bob, "and the next one").await;
    for browser in [&alice, &bob] {
        let bodies: Vec<String> = messages(browser).await.into_iter().map(|(_, _, body)| body).collect();
        assert_eq!(bodies, ["exactly once", "and the next one"]);
    }
    bob.refresh().await.expect("reload");
    wait_for(&bob, "the live connection", "document.body.dataset.live === 'connected'").await;
    assert_eq!(messages(&bob).await.len(), 2, "stored once");
    alice.close().await.expect("close");
    bob.close().await.expect("close");
    server.stop().await;
}

/// The `data-` attribute `name` of the first element matching `css`, or "" if none.
async fn attribute(browser: &Client, css: &str, name: &str) -> String {
    let script = format!("const e = document.querySelector({css:?}); return e ? (e.dataset[{name:?}] || '') : '';");
    eval(browser, &script).await.as_str().unwrap_or_default().to_owned()
}

/// Submits the form matching `css` and waits for the page it leads to.
async fn submit(browser: &Client, css: &str) {
    let button = browser.find(Locator::Css(&format!("{css} button"))).await.unwrap_or_else(|_| panic!("no {css}"));
    button.click().await.expect("submit");
    wait_for(browser, "the next page", "document.readyState === 'complete'").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_logs_in_pauses_a_handler_and_rebuilds_search_in_the_console() {
    let dir = tempfile::tempdir().expect("dir");
    let url = format!("sqlite://{}", dir.path().join("chat.db").display());
    let store = cqrs_sqlite::SqliteEventStore::connect(&url).await.expect("open");
    let backend = livechat_app::search::Backend::Sqlite { url, store: store.clone() };
    let config = livechat_app::AppConfig { admin_token: Some("s3cret".into()), ..livechat_app::AppConfig::default() };
    let server = TestServer::start_searching_with(std::sync::Arc::new(store), backend, config).await;
    let base = format!("http://{}", server.addr);
    let driver = Driver::start().await;
    let alice = driver.browser().await;
    join(&alice, &base, "alice", "food").await;
    send(&alice, "pizza tonight").await;
    let ops = driver.browser().await;

    // Nothing without the token; the login form sets the cookie.
    ops.goto(&format!("{base}/admin/handlers?live=0")).await.expect("open console");
    wait_for(&ops, "the login form", "document.querySelector('form#login') !== null").await;
    ops.find(Locator::Css("form#login input[name=token]"))
        .await
        .expect("field")
        .send_keys("s3cret")
        .await
        .expect("type");
    submit(&ops, "form#login").await;
    ops.goto(&format!("{base}/admin/handlers?live=0")).await.expect("handlers");
    let row = "#handlers tr[data-handler='chat-search']";
    wait_for(&ops, "the search projection's row", &format!("document.querySelector(\"{row}\") !== null")).await;
    assert_eq!(attribute(&ops, row, "state").await, "running");

    // Pause and resume it.
    submit(&ops, &format!("{row} form.pause")).await;
    ops.goto(&format!("{base}/admin/handlers?live=0")).await.expect("handlers");
    assert!(attribute(&ops, row, "state").await.starts_with("paused by token (browser)"));
    let started = Instant::now();
    while !matches!(
        server.state.progress.status("chat-search").map(|s| s.state),
        Some(cqrs_core::HandlerState::Paused { .. })
    ) {
        assert!(started.elapsed() < WAIT, "the runner did not pause");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    submit(&ops, &format!("{row} form.resume")).await;
    let started = Instant::now();
    loop {
        ops.goto(&format!("{base}/admin/handlers?live=0")).await.expect("handlers");
        if attribute(&ops, row, "state").await == "running" {
            break;
        }
        assert!(started.elapsed() < WAIT, "not running again after the resume");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Rebuild search beside the live index and switch to it; searching goes on throughout.
    ops.goto(&format!("{base}/admin/rebuilds?live=0")).await.expect("rebuilds");
    submit(&ops, "#rebuilds form.build").await;
    ops.goto(&format!("{base}/admin/rebuilds?live=0")).await.expect("rebuilds");
    assert_eq!(attribute(&ops, "#rebuilds tr[data-version='2']", "role").await, "building");
    submit(&ops, "#rebuilds tr[data-version='2'] form.switch").await;
    ops.goto(&format!("{base}/admin/rebuilds?live=0")).await.expect("rebuilds");
    assert_eq!(attribute(&ops, "#rebuilds tr[data-version='2']", "role").await, "live");
    assert_eq!(search_live(&alice, "pizza", 1).await[0].0, "food/1", "search answers from version 2");

    // The log, and one event.
    ops.goto(&format!("{base}/admin/streams")).await.expect("streams");
    wait_for(&ops, "the log", "document.querySelectorAll('#events tr[data-position]').length >= 1").await;
    ops.find(Locator::Css("#events tr[data-position] a")).await.expect("event link").click().await.expect("open");
    wait_for(
        &ops,
        "the event's payload",
        "(document.querySelector('#payload') || {}).textContent?.includes('pizza tonight')",
    )
    .await;
    alice.close().await.expect("close");
    ops.close().await.expect("close");
    server.stop().await;
}
