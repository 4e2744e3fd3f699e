//! Bad files and paths give typed errors, never a panic; a damaged row fails the read with
//! `StoreError::Corrupt`.

use cqrs_core::testing::conformance::event;
use cqrs_core::{DecodeError, EventStore, ExpectedVersion, Position, StoreError, Upcasters, Version};
use cqrs_sqlite::{SqliteEventStore, SqliteStoreError};
use sqlx::{Connection, Executor, SqliteConnection};

use crate::support::{file_of, stream, temp_store};

#[tokio::test]
async fn a_file_that_is_not_a_database_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("notes.txt");
    let text = "These are not the bytes of a SQLite database. ".repeat(200);
    std::fs::write(&path, &text).expect("write");
    match SqliteEventStore::open(&path).await {
        Err(SqliteStoreError::NotADatabase { path: reported, .. }) => assert_eq!(reported, path),
        other => panic!("expected NotADatabase, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&path).expect("read"), text, "the file must be left alone");
}

#[tokio::test]
async fn a_path_that_cannot_be_created_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The parent is a regular file.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").expect("write");
    assert!(matches!(SqliteEventStore::open(file.join("events.db")).await, Err(SqliteStoreError::Open { .. })));
    // A directory.
    assert!(matches!(SqliteEventStore::open(dir.path()).await, Err(SqliteStoreError::Open { .. })));
    // A read-only file system (root ignores permission bits, but not this).
    if std::path::Path::new("/proc/self").exists() {
        let result = SqliteEventStore::open("/proc/cqrs-sqlite-test.db").await;
        assert!(matches!(result, Err(SqliteStoreError::Open { .. })), "got {result:?}");
    }
}

#[tokio::test]
async fn in_memory_urls_are_refused() {
    for url in ["sqlite::memory:", "sqlite://events.db?mode=memory"] {
        assert!(matches!(SqliteEventStore::connect(url).await, Err(SqliteStoreError::InMemory)), "{url}");
    }
}

#[tokio::test]
async fn a_malformed_url_is_refused() {
    let result = SqliteEventStore::connect("sqlite://events.db?mode=sideways").await;
    assert!(matches!(result, Err(SqliteStoreError::InvalidUrl(_))), "got {result:?}");
}

#[tokio::test]
async fn connect_creates_the_file_from_a_url() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("new.db");
    let store = SqliteEventStore::connect(&format!("sqlite://{}", path.display())).await.expect("connect");
    assert!(path.exists());
    assert_eq!(store.path(), path);
    store.append(&stream("url"), ExpectedVersion::NoStream, vec![event(1)]).await.expect("append");
}

#[tokio::test]
async fn a_database_with_a_conflicting_schema_is_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("other.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let mut connection = SqliteConnection::connect(&url).await.expect("create");
    connection.execute("CREATE TABLE cqrs_events (id INTEGER PRIMARY KEY)").await.expect("other schema");
    connection.close().await.expect("close");
    let result = SqliteEventStore::open(&path).await;
    assert!(matches!(result, Err(SqliteStoreError::Migrate(_))), "got {result:?}");
}

#[tokio::test]
async fn a_damaged_row_is_reported_as_corrupt_and_a_damaged_payload_when_decoded() {
    let temp = temp_store().await;
    let s = stream("damaged");
    temp.store.append(&s, ExpectedVersion::Any, vec![event(1)]).await.expect("append");
    let mut connection =
        SqliteConnection::connect(&format!("sqlite://{}", file_of(&temp).display())).await.expect("open");
    connection
        .execute(
            "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, \
             headers, recorded_at) VALUES (2, randomblob(16), 'damaged-x', 1, 'T', 1, '{not json', '{}', 0)",
        )
        .await
        .expect("insert a damaged row");
    connection.close().await.expect("close");
    // The payload is not parsed when read (it is parsed once, when decoded): the row is
    // returned, and decoding it fails with the parser's error.
    let events = temp.store.read_all(Position::START, 10).await.expect("read");
    let damaged = events.iter().find(|e| e.stream_id.as_str() == "damaged-x").expect("the damaged row");
    assert_eq!(damaged.payload.json(), "{not json");
    assert!(damaged.payload.value().is_err());
    /// The damaged row's event type.
    #[derive(Debug, Clone, serde::Serialize, serde::Deserialize, cqrs_core::DomainEvent)]
    #[event(name = "T", category = "*")]
    struct T {
        n: u64,
    }
    match Upcasters::new().decode_payload::<T>(damaged) {
        Err(DecodeError::Payload { position, .. }) => assert_eq!(position, Position(2)),
        other => panic!("expected a payload decode error, got {other:?}"),
    }
    // A damaged column the row itself needs (here its tags) is reported when read.
    let mut connection =
        SqliteConnection::connect(&format!("sqlite://{}", file_of(&temp).display())).await.expect("open");
    connection
        .execute(
            "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, \
             headers, recorded_at, tags) VALUES (3, randomblob(16), 'damaged-y', 1, 'T', 1, '{}', '{}', 0, '[oops')",
        )
        .await
        .expect("insert a row with damaged tags");
    connection.close().await.expect("close");
    match temp.store.read_all(Position(2), 10).await {
        Err(StoreError::Corrupt(message)) => assert!(message.contains("tags"), "{message}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // The intact stream is still readable.
    assert_eq!(temp.store.read_stream(&s, Version(1), 10).await.expect("read").len(), 1);
    // Stored events cannot be changed.
    let mut connection =
        SqliteConnection::connect(&format!("sqlite://{}", file_of(&temp).display())).await.expect("open");
    assert!(connection.execute("DELETE FROM cqrs_events").await.is_err());
    assert!(connection.execute("UPDATE cqrs_events SET payload = '{}'").await.is_err());
}
