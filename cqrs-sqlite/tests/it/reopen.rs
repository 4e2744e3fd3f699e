//! Durability across a restart: a new store on the same file sees every event, checkpoint,
//! snapshot and command id, and goes on from the stored positions and versions.

use std::collections::HashMap;

use cqrs_core::testing::conformance::{event, event_with};
use cqrs_core::{
    AppendCondition, AppendOutcome, CausationId, CommandId, CorrelationId, EventStore, ExpectedVersion, Metadata,
    Position, Query, QueryItem, Snapshot, StoreError, Version,
};
use serde_json::json;

use crate::support::{file_of, reopen, stream, temp_store};
use cqrs_core::testing::WithGuard;

async fn read_everything(store: &impl EventStore) -> Vec<cqrs_core::RecordedEvent> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(Position::START, |e: &cqrs_core::RecordedEvent| e.position);
        let page = store.read_all(after, 64).await.expect("read_all");
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_keeps_every_event_checkpoint_and_snapshot() {
    let temp = temp_store().await;
    let store = &temp.store;
    let streams: Vec<_> = (0..5).map(|i| stream(&format!("reopen{i}"))).collect();
    let command_id = CommandId::new();
    let metadata = Metadata {
        command_id: Some(command_id),
        causation_id: Some(CausationId::new()),
        correlation_id: Some(CorrelationId::new()),
        headers: HashMap::from([("user".to_owned(), "ada".to_owned())]),
    };
    let first = store
        .append(&streams[0], ExpectedVersion::NoStream, vec![event_with(0, metadata.clone()), event_with(1, metadata)])
        .await
        .expect("append");
    for n in 0..100u64 {
        let s = &streams[usize::try_from(n % 5).expect("small")];
        store.append(s, ExpectedVersion::Any, vec![event(n + 10)]).await.expect("append");
    }
    for i in 0..20u64 {
        store.save_checkpoint(&format!("projection-{i}"), Position(i * 7)).await.expect("checkpoint");
    }
    let snapshot =
        Snapshot { stream_id: streams[1].clone(), version: Version(3), schema_version: 2, state: json!({"n": 3}) };
    store.save_snapshot(snapshot.clone()).await.expect("snapshot");
    let before = read_everything(store).await;
    assert_eq!(before.len(), 102);
    let path = file_of(&temp);
    let WithGuard { store, guard: dir } = temp;
    drop(store);

    let reopened = reopen(&path).await;
    assert_eq!(read_everything(&reopened).await, before, "every event, with its envelope, must come back");
    for i in 0..20u64 {
        assert_eq!(reopened.load_checkpoint(&format!("projection-{i}")).await.expect("load"), Some(Position(i * 7)));
    }
    assert_eq!(reopened.load_snapshot(&streams[1]).await.expect("snapshot"), Some(snapshot));
    assert_eq!(reopened.stream_version(&streams[0]).await.expect("version"), Version(22));
    // The command id is still known, whatever the expected version.
    let again = reopened
        .append(
            &streams[0],
            ExpectedVersion::NoStream,
            vec![event_with(99, Metadata { command_id: Some(command_id), ..Metadata::default() })],
        )
        .await
        .expect("duplicate");
    assert_eq!(again, AppendOutcome::Duplicate(first.result()));
    // New appends continue after the stored positions and versions.
    let next =
        reopened.append(&streams[0], ExpectedVersion::Exact(Version(22)), vec![event(500)]).await.expect("append");
    let last = before.last().expect("events").position;
    assert_eq!(next.result().first_position, Position(last.0 + 1));
    assert_eq!(next.result().last_version, Version(23));
    assert_eq!(*reopened.notifications().borrow(), next.result().last_position);
    drop(reopened);
    drop(dir);
}

/// A store opened on a file that already holds events starts its notification watch at the
/// stored head, so a subscriber does not mistake old events for news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_start_at_the_stored_head() {
    let temp = temp_store().await;
    let s = stream("head");
    let result = temp.store.append(&s, ExpectedVersion::Any, vec![event(1), event(2)]).await.expect("append");
    assert_eq!(*temp.store.notifications().borrow(), result.result().last_position);
    let path = file_of(&temp);
    let WithGuard { store, guard: dir } = temp;
    drop(store);
    let reopened = reopen(&path).await;
    assert_eq!(*reopened.notifications().borrow(), result.result().last_position);
    drop(reopened);
    drop(dir);
}

/// A connection to a new file at `path` migrated only by the migrations named before
/// `before`, from a copy of them in `dir`: the schema as an older release left it.
async fn file_of_older_schema(dir: &std::path::Path, path: &std::path::Path, before: &str) -> sqlx::SqliteConnection {
    use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
    use sqlx::ConnectOptions;

    let older = dir.join(format!("migrations-before-{before}"));
    std::fs::create_dir(&older).expect("migrations dir");
    let migrations = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    for entry in std::fs::read_dir(&migrations).expect("read migrations") {
        let entry = entry.expect("migration");
        let name = entry.file_name().into_string().expect("utf-8 name");
        if name.as_str() < before {
            std::fs::copy(entry.path(), older.join(&name)).expect("copy migration");
        }
    }
    let options =
        SqliteConnectOptions::new().filename(path).create_if_missing(true).journal_mode(SqliteJournalMode::Wal);
    let mut connection = options.connect().await.expect("connect");
    sqlx::migrate::Migrator::new(older.as_path())
        .await
        .expect("older migrations")
        .run(&mut connection)
        .await
        .expect("migrate to the older schema");
    connection
}

/// A file migrated only up to before command ids were keyed by (command_id, stream_id), with
/// one event of type `Old` on `s` stored by `old_command`, as that schema stored them.
async fn file_before_the_key_changed(
    dir: &std::path::Path,
    path: &std::path::Path,
    s: &cqrs_core::StreamId,
    old_command: CommandId,
) {
    use sqlx::Connection;

    let mut connection = file_of_older_schema(dir, path, "20261201000003").await;
    let event_id = cqrs_core::EventId::new();
    sqlx::query(
        "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, \
         command_id, headers, recorded_at) VALUES (1, ?1, ?2, 1, 'Old', 1, '{}', ?3, '{}', 1)",
    )
    .bind(event_id.0)
    .bind(s.as_str())
    .bind(old_command.0)
    .execute(&mut connection)
    .await
    .expect("old event");
    sqlx::query("INSERT INTO cqrs_streams (stream_id, version) VALUES (?1, 1)")
        .bind(s.as_str())
        .execute(&mut connection)
        .await
        .expect("old stream");
    sqlx::query(
        "INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position, \
         last_position, recorded_at) VALUES (?1, ?2, 1, 1, 1, 1, 1)",
    )
    .bind(s.as_str())
    .bind(old_command.0)
    .execute(&mut connection)
    .await
    .expect("old command row");
    connection.close().await.expect("close");
}

/// A file made before command ids were keyed by (command_id, stream_id) keeps its command ids
/// through the migration: a repeated command is still answered as the duplicate it is, new
/// ones are stored and found, and pruning still forgets them. Its events, stored before tags
/// existed, read back with no tags, and are found by type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_ids_stored_before_the_key_changed_are_still_known() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.db");
    let s = stream("old-key");
    let old_command = CommandId::new();
    file_before_the_key_changed(dir.path(), &path, &s, old_command).await;

    let store = reopen(&path).await;
    let stored = cqrs_core::AppendResult {
        first_version: Version(1),
        last_version: Version(1),
        first_position: Position(1),
        last_position: Position(1),
    };
    assert_eq!(store.find_command(&s, old_command).await.expect("find"), Some(stored));
    let again = store
        .append(
            &s,
            ExpectedVersion::NoStream,
            vec![event_with(1, Metadata { command_id: Some(old_command), ..Metadata::default() })],
        )
        .await
        .expect("duplicate");
    assert_eq!(again, AppendOutcome::Duplicate(stored));
    let old = store.read_all(Position::START, 10).await.expect("read_all");
    assert_eq!((old.len(), old[0].tags.len()), (1, 0), "an event stored before tags has none: {old:?}");
    let by_type = Query::from_items([QueryItem::types(["Old"])]);
    assert_eq!(store.read_query(&by_type, Position::START, 10).await.expect("read_query"), old);
    let condition = AppendCondition::new(by_type, None);
    let refused =
        store.append_with_condition(&stream("after-old"), ExpectedVersion::Any, vec![event(4)], Some(condition)).await;
    assert!(matches!(refused, Err(StoreError::ConditionFailed { position: Position(1) })), "{refused:?}");
    // The same command id on another stream is another command.
    let other = stream("old-key-other");
    let elsewhere = store
        .append(
            &other,
            ExpectedVersion::NoStream,
            vec![event_with(2, Metadata { command_id: Some(old_command), ..Metadata::default() })],
        )
        .await
        .expect("append elsewhere");
    assert!(matches!(elsewhere, AppendOutcome::Appended(_)), "{elsewhere:?}");
    let new_command = CommandId::new();
    let appended = store
        .append(
            &s,
            ExpectedVersion::Exact(Version(1)),
            vec![event_with(3, Metadata { command_id: Some(new_command), ..Metadata::default() })],
        )
        .await
        .expect("append");
    assert_eq!(store.find_command(&s, new_command).await.expect("find"), Some(appended.result()));
    // The old row (recorded at 1 µs after the epoch) is the only one old enough to prune.
    assert_eq!(store.prune_commands(cqrs_core::Timestamp(2)).await.expect("prune"), 1);
    assert_eq!(store.find_command(&s, old_command).await.expect("find"), None);
    assert_eq!(store.find_command(&s, new_command).await.expect("find"), Some(appended.result()));
    drop(store);
    drop(dir);
}

/// One append as the three-row schema (before `20261208000001_one_row_per_event`) stored it:
/// its events, and its command row unless `pruned`. The stream rows are written at the end.
struct OldAppend<'a> {
    stream: &'a cqrs_core::StreamId,
    versions: std::ops::RangeInclusive<i64>,
    positions: std::ops::RangeInclusive<i64>,
    command: Option<CommandId>,
    pruned: bool,
    recorded_at: i64,
}

/// A file of the schema before one row per event, holding `appends` as that schema stored them
/// (events, command rows of those not pruned, each stream's version). Returns the event ids.
async fn file_of_three_rows_per_append(
    dir: &std::path::Path,
    path: &std::path::Path,
    appends: &[OldAppend<'_>],
) -> Vec<cqrs_core::EventId> {
    use sqlx::Connection;

    let mut connection = file_of_older_schema(dir, path, "20261208000001").await;
    let mut ids = Vec::new();
    let mut versions = HashMap::new();
    for append in appends {
        for (version, position) in append.versions.clone().zip(append.positions.clone()) {
            let event_id = cqrs_core::EventId::new();
            ids.push(event_id);
            sqlx::query(
                "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, \
                 payload, command_id, headers, recorded_at) VALUES (?1, ?2, ?3, ?4, 'Old', 1, '{}', ?5, '{}', ?6)",
            )
            .bind(position)
            .bind(event_id.0)
            .bind(append.stream.as_str())
            .bind(version)
            .bind(append.command.map(|id| id.0))
            .bind(append.recorded_at)
            .execute(&mut connection)
            .await
            .expect("old event");
        }
        versions.insert(append.stream.as_str(), *append.versions.end());
        if let (Some(command), false) = (append.command, append.pruned) {
            sqlx::query(
                "INSERT INTO cqrs_commands (stream_id, command_id, first_version, last_version, first_position, \
                 last_position, recorded_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )
            .bind(append.stream.as_str())
            .bind(command.0)
            .bind(append.versions.start())
            .bind(append.versions.end())
            .bind(append.positions.start())
            .bind(append.positions.end())
            .bind(append.recorded_at)
            .execute(&mut connection)
            .await
            .expect("old command row");
        }
    }
    for (stream, version) in versions {
        sqlx::query("INSERT INTO cqrs_streams (stream_id, version) VALUES (?1, ?2)")
            .bind(stream)
            .bind(version)
            .execute(&mut connection)
            .await
            .expect("old stream");
    }
    connection.close().await.expect("close");
    ids
}

/// A file made by the three-row schema (an event row, a stream row, a command row per append)
/// keeps, through the migration to one row per event, every event, every stream's version and
/// every command id it remembered with its first outcome (one of several events, one reused
/// after pruning, one on two streams), and still forgets those it had pruned; appends go on
/// from its versions and positions, and pruning goes on from where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_three_rows_per_append_keeps_every_event_and_command_id() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("events.db");
    let (a, b, c) = (stream("three-a"), stream("three-b"), stream("three-c"));
    let (reused, gone, several, kept) = (CommandId::new(), CommandId::new(), CommandId::new(), CommandId::new());
    let old = |stream, versions, positions, command, pruned, recorded_at| OldAppend {
        stream,
        versions,
        positions,
        command,
        pruned,
        recorded_at,
    };
    let appends = [
        old(&c, 1..=1, 1..=1, Some(gone), true, 10),
        old(&b, 1..=1, 2..=2, None, false, 10),
        // The newest pruned append: its id is stored again below, for the same stream.
        old(&a, 1..=2, 3..=4, Some(reused), true, 10),
        old(&a, 3..=5, 5..=7, Some(several), false, 100),
        old(&b, 2..=2, 8..=8, Some(kept), false, 100),
        old(&a, 6..=6, 9..=9, Some(reused), false, 100),
        old(&c, 2..=2, 10..=10, Some(several), false, 100),
    ];
    let ids = file_of_three_rows_per_append(dir.path(), &path, &appends).await;

    let store = reopen(&path).await;
    let events = read_everything(&store).await;
    let stored: Vec<_> = events.iter().map(|event| (event.position.0, event.event_id)).collect();
    assert_eq!(stored, (1..=10).zip(ids).collect::<Vec<_>>(), "every event, in its place");
    for (s, version) in [(&a, 6), (&b, 2), (&c, 2)] {
        assert_eq!(store.stream_version(s).await.expect("version"), Version(version), "{s}");
    }
    let result = |versions: (u64, u64), positions: (u64, u64)| cqrs_core::AppendResult {
        first_version: Version(versions.0),
        last_version: Version(versions.1),
        first_position: Position(positions.0),
        last_position: Position(positions.1),
    };
    let remembered = [
        (&a, several, result((3, 5), (5, 7))),
        (&b, kept, result((2, 2), (8, 8))),
        (&a, reused, result((6, 6), (9, 9))),
        (&c, several, result((2, 2), (10, 10))),
    ];
    for (s, command, outcome) in &remembered {
        assert_eq!(store.find_command(s, *command).await.expect("find"), Some(*outcome), "{s} {command}");
    }
    assert_eq!(store.find_command(&c, gone).await.expect("find"), None, "pruned before: still forgotten");
    let with = |n, command| vec![event_with(n, Metadata { command_id: Some(command), ..Metadata::default() })];
    let again = store.append(&a, ExpectedVersion::NoStream, with(20, several)).await.expect("duplicate");
    assert_eq!(again, AppendOutcome::Duplicate(remembered[0].2), "the first outcome, not a conflict");
    let conflict = store.append(&b, ExpectedVersion::Exact(Version(1)), vec![event(21)]).await;
    assert!(
        matches!(conflict, Err(StoreError::Conflict { actual: Version(2), .. })),
        "the stream's version: {conflict:?}"
    );
    let anew = store.append(&c, ExpectedVersion::Exact(Version(2)), with(22, gone)).await.expect("append");
    assert_eq!(anew, AppendOutcome::Appended(result((3, 3), (11, 11))), "a forgotten id is a new command");

    // Pruning goes on past the old horizon: everything recorded before 101 µs, and only that.
    assert_eq!(store.prune_commands(cqrs_core::Timestamp(50)).await.expect("prune"), 0);
    assert_eq!(store.prune_commands(cqrs_core::Timestamp(101)).await.expect("prune"), 4);
    for (s, command, _) in &remembered {
        assert_eq!(store.find_command(s, *command).await.expect("find"), None, "{s} {command}");
    }
    assert_eq!(store.find_command(&c, gone).await.expect("find"), Some(result((3, 3), (11, 11))));
    drop(store);
    drop(dir);
}

/// Pruning walks the log a chunk of 10 000 events per writer request and never stops inside an
/// append: with an append of several events straddling the first chunk's end, one prune
/// forgets its command id once (not once per part), and only ids recorded before the bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_crosses_chunks_without_splitting_an_append() {
    let temp = temp_store().await;
    let store = &temp.store;
    let with = |n, command| event_with(n, Metadata { command_id: Some(command), ..Metadata::default() });
    // 9 999 events with no command id, then one append of 5 across positions 10 000–10 004.
    let filler: Vec<_> = (0..9_999).map(event).collect();
    store.append(&stream("filler"), ExpectedVersion::NoStream, filler).await.expect("filler");
    let (straddling, after) = (CommandId::new(), CommandId::new());
    let s = stream("straddling");
    let stored = store
        .append(&s, ExpectedVersion::NoStream, (0..5).map(|n| with(n, straddling)).collect())
        .await
        .expect("straddling append")
        .result();
    assert_eq!((stored.first_position, stored.last_position), (Position(10_000), Position(10_004)));
    let bound = cqrs_core::Timestamp::now().plus(std::time::Duration::from_millis(1));
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let later = store.append(&s, ExpectedVersion::Any, vec![with(9, after)]).await.expect("later").result();

    assert_eq!(store.prune_commands(bound).await.expect("prune"), 1, "one append, counted once");
    assert_eq!(store.find_command(&s, straddling).await.expect("find"), None);
    assert_eq!(store.find_command(&s, after).await.expect("find"), Some(later), "recorded after the bound");
    assert_eq!(store.prune_commands(bound).await.expect("prune"), 0, "nothing left before the bound");
}
