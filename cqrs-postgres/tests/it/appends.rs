//! Batch edge cases: an event id reused inside one group-commit batch fails only the guilty
//! append, and the batch function itself refuses a reused id through the unique index; the
//! set-based batch function answers and writes like the per-append one.

use cqrs_core::testing::conformance::event;
use cqrs_core::{EventStore, ExpectedVersion, StoreError};
use cqrs_postgres::{PgEventStore, PgStoreConfig};
use serde_json::json;

use crate::support::{random_below, read_everything, stream, TestDb};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_function_refuses_an_event_id_used_twice() {
    let db = TestDb::create().await;
    let _store = db.store().await;
    let id = uuid::Uuid::new_v4();
    let one = |s: &str| json!({"s": s, "e": "any", "c": null, "ev": [{"id": id, "t": "T", "sv": 1, "p": {}, "h": {}}]});
    let mut connection = db.connection().await;
    let error = sqlx::query("SELECT * FROM cqrs_append_batch($1)")
        .bind(sqlx::types::Json(json!([one("a-1"), one("b-1")])))
        .fetch_all(&mut connection)
        .await
        .expect_err("a reused event id must fail the batch");
    let db_error = error.as_database_error().expect("database error");
    assert!(db_error.is_unique_violation());
    assert_eq!(db_error.constraint(), Some("cqrs_events_event_id_key"));
    let stored: i64 =
        sqlx::query_scalar("SELECT count(*) FROM cqrs_events").fetch_one(&mut connection).await.expect("count");
    assert_eq!(stored, 0, "the failed batch wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_event_id_in_a_batch_fails_only_its_append() {
    let db = TestDb::create().await;
    let store = db.store_with(PgStoreConfig::default().with_max_connections(4)).await;
    for _round in 0..5 {
        let shared = event(0);
        let tasks: Vec<_> = (0..16)
            .map(|n| {
                let store = store.clone();
                let sent = if n == 3 || n == 11 { shared.clone() } else { event(n) };
                tokio::spawn(async move { store.append(&stream("reuse"), ExpectedVersion::Any, vec![sent]).await })
            })
            .collect();
        let (mut ok, mut duplicates) = (0, 0);
        for task in tasks {
            match task.await.expect("task") {
                Ok(_) => ok += 1,
                Err(StoreError::DuplicateEventId(id)) if id == shared.event_id => duplicates += 1,
                Err(other) => panic!("unexpected error {other}"),
            }
        }
        assert_eq!((ok, duplicates), (15, 1));
    }
    assert_eq!(read_everything(&store).await.len(), 5 * 15);
}

/// A payload PostgreSQL cannot store (a NUL character in a JSON string) fails only its own
/// append, as `InvalidAppend`; the appends batched with it are stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_payload_fails_only_its_append() {
    let db = TestDb::create().await;
    let store = db.store().await;
    for _round in 0..3 {
        let tasks: Vec<_> = (0..12u64)
            .map(|n| {
                let store = store.clone();
                let mut sent = event(n);
                if n == 5 {
                    sent.payload = json!({"n": n, "text": "nul \u{0} inside"});
                }
                tokio::spawn(async move { (n, store.append(&stream("nul"), ExpectedVersion::Any, vec![sent]).await) })
            })
            .collect();
        for task in tasks {
            match task.await.expect("task") {
                (5, Err(StoreError::InvalidAppend(_))) => {}
                (5, other) => panic!("the NUL payload must be refused as invalid, got {other:?}"),
                (_, result) => assert!(result.is_ok(), "a valid append must be stored: {result:?}"),
            }
        }
    }
    assert_eq!(read_everything(&store).await.len(), 3 * 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstorable_payload_alone_is_invalid() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let mut sent = event(1);
    sent.payload = json!({"text": "nul \u{0} inside"});
    let result = store.append(&stream("nul"), ExpectedVersion::Any, vec![sent]).await;
    assert!(matches!(result, Err(StoreError::InvalidAppend(_))), "got {result:?}");
    store.append(&stream("fine"), ExpectedVersion::Any, vec![event(2)]).await.expect("the store still works");
}

/// One append of a generated batch, as both batch functions take it.
struct RawAppend {
    stream: String,
    kind: &'static str,
    expected: Option<i64>,
    command: Option<uuid::Uuid>,
    continues: bool,
    events: Vec<(uuid::Uuid, String, serde_json::Value)>,
    /// The tags of each of its events (only the single-event comparisons give any).
    tags: Vec<String>,
    /// Its condition: after this position, no event may match these items (as
    /// `cqrs_append_batch` takes them).
    condition: Option<(i64, serde_json::Value)>,
}

/// One result row: append index, outcome, actual version, first and last version, first and
/// last position (renumbered), duplicate event id.
type Answer = (i32, String, Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<i64>, Option<uuid::Uuid>);
/// One stored event: position (renumbered), stream, version, id, type, payload, command id, tags.
type StoredRow = (i64, String, i64, uuid::Uuid, String, serde_json::Value, Option<uuid::Uuid>, Vec<String>);

/// What a batch function answered and left behind (inside a transaction that is then rolled
/// back), with every position this batch allocated renumbered from 1 so the two runs compare.
#[derive(Debug, PartialEq)]
struct BatchEffect {
    answers: Vec<Answer>,
    events: Vec<StoredRow>,
    /// The tag index's rows: tag, position (renumbered).
    tag_rows: Vec<(String, i64)>,
    streams: Vec<(String, i64)>,
    commands: Vec<(String, uuid::Uuid, i64, i64, i64, i64)>,
}

/// Which way a batch is written.
#[derive(Clone, Copy, PartialEq)]
enum Writer {
    /// `cqrs_append_batch`, append by append.
    PerAppend,
    /// `cqrs_append_arrays`.
    SetBased,
    /// The writer's statement for a lone append of one event (`single_event_sql`).
    SingleEvent,
    /// `cqrs_append_conditional`, for a lone conditional append of one event.
    Conditional,
}

async fn run_batch(
    connection: &mut sqlx::PgConnection,
    batch: &[RawAppend],
    writer: Writer,
) -> Result<BatchEffect, sqlx::Error> {
    use sqlx::Connection;
    let mut transaction = connection.begin().await?;
    // Positions taken by the rolled-back run of the other function are not given back.
    let before: i64 =
        sqlx::query_scalar("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM cqrs_position_seq")
            .fetch_one(&mut *transaction)
            .await?;
    let columns = "append_index, outcome, actual_version, first_version, last_version, first_position, \
                   last_position, duplicate_event_id";
    let rows: Vec<sqlx::postgres::PgRow> = if writer == Writer::SingleEvent {
        let [append] = batch else { panic!("the single-event statement takes one append") };
        let [(id, event_type, payload)] = append.events.as_slice() else { panic!("and one event") };
        let query = sqlx::query(cqrs_postgres::single_event_sql(!append.tags.is_empty()))
            .bind(&append.stream)
            .bind(append.kind)
            .bind(append.expected)
            .bind(append.command)
            .bind(id)
            .bind(event_type)
            .bind(1i32)
            .bind(sqlx::types::Json(payload))
            .bind(None::<uuid::Uuid>)
            .bind(None::<uuid::Uuid>)
            .bind(sqlx::types::Json(json!({"h": "1"})))
            .bind(false);
        let query = if append.tags.is_empty() { query } else { query.bind(&append.tags) };
        query.fetch_all(&mut *transaction).await?
    } else if writer == Writer::Conditional {
        let [append] = batch else { panic!("the conditional function takes one append") };
        let [(id, event_type, payload)] = append.events.as_slice() else { panic!("and one event") };
        let Some((after, items)) = &append.condition else { panic!("and a condition") };
        sqlx::query(&format!(
            "SELECT {columns} FROM cqrs_append_conditional($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(&append.stream)
        .bind(append.kind)
        .bind(append.expected)
        .bind(append.command)
        .bind(id)
        .bind(event_type)
        .bind(1i32)
        .bind(sqlx::types::Json(payload))
        .bind(None::<uuid::Uuid>)
        .bind(None::<uuid::Uuid>)
        .bind(sqlx::types::Json(json!({"h": "1"})))
        .bind(&append.tags)
        .bind(after)
        .bind(sqlx::types::Json(items))
        .bind(false)
        .fetch_all(&mut *transaction)
        .await?
    } else if writer == Writer::SetBased {
        arrays_call(
            &format!(
                "SELECT {columns} FROM cqrs_append_arrays($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
            ),
            batch,
        )
        .fetch_all(&mut *transaction)
        .await?
    } else {
        sqlx::query(&format!("SELECT {columns} FROM cqrs_append_batch($1)"))
            .bind(sqlx::types::Json(batch_json(batch)))
            .fetch_all(&mut *transaction)
            .await?
    };
    let renumber = |position: Option<i64>| position.map(|p| if p > before { p - before } else { -p });
    let mut answers = Vec::new();
    for row in &rows {
        use sqlx::Row;
        answers.push((
            row.try_get("append_index")?,
            row.try_get("outcome")?,
            row.try_get("actual_version")?,
            row.try_get("first_version")?,
            row.try_get("last_version")?,
            renumber(row.try_get("first_position")?),
            renumber(row.try_get("last_position")?),
            row.try_get("duplicate_event_id")?,
        ));
    }
    answers.sort_by_key(|answer| answer.0);
    let events: Vec<StoredRow> = sqlx::query_as(
        "SELECT position - $1, stream_id, version, event_id, event_type, payload, command_id, tags FROM cqrs_events \
         WHERE position > $1 ORDER BY position",
    )
    .bind(before)
    .fetch_all(&mut *transaction)
    .await?;
    let tag_rows =
        sqlx::query_as("SELECT tag, position - $1 FROM cqrs_event_tags WHERE position > $1 ORDER BY position, tag")
            .bind(before)
            .fetch_all(&mut *transaction)
            .await?;
    let streams = sqlx::query_as("SELECT stream_id, version FROM cqrs_streams ORDER BY stream_id")
        .fetch_all(&mut *transaction)
        .await?;
    let commands: Vec<(String, uuid::Uuid, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT stream_id, command_id, first_version, last_version, first_position, last_position \
         FROM cqrs_commands ORDER BY stream_id, command_id",
    )
    .fetch_all(&mut *transaction)
    .await?;
    let commands = commands
        .into_iter()
        .map(|(s, c, f, l, fp, lp)| (s, c, f, l, renumber(Some(fp)).unwrap_or(0), renumber(Some(lp)).unwrap_or(0)))
        .collect();
    transaction.rollback().await?;
    Ok(BatchEffect { answers, events, tag_rows, streams, commands })
}

/// The set-based `cqrs_append_arrays` against the per-append loop of `cqrs_append_batch`, on
/// random batches over a few streams (new and existing ones, every kind of expected version,
/// command ids stored before or earlier in the same batch, chains, several events per
/// append): the same answers and the same rows written, batch after batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_based_batches_answer_and_write_like_the_per_append_loop() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let mut connection = db.connection().await;
    let names = ["a", "b", "b-", "c", "ä"];
    let mut stored_commands: Vec<(String, uuid::Uuid)> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for round in 0..150 {
        let versions = stream_versions(&mut connection).await;
        let mut batch: Vec<RawAppend> = (0..1 + random_below(8))
            .map(|_| {
                let stream = names[random_below(names.len() as u64) as usize].to_owned();
                let version = versions.get(&stream).copied().unwrap_or(0);
                let (kind, expected) = random_expectation(version);
                let command = random_command(&stored_commands, &stream);
                let events = (0..1 + random_below(3))
                    .map(|n| (uuid::Uuid::new_v4(), format!("T{n}"), json!({"round": round, "n": n})))
                    .collect();
                RawAppend {
                    stream,
                    kind,
                    expected,
                    command,
                    continues: false,
                    events,
                    tags: Vec::new(),
                    condition: None,
                }
            })
            .collect();
        // As the writer sends them: sorted by stream (stable), byte order.
        batch.sort_by(|x, y| x.stream.as_bytes().cmp(y.stream.as_bytes()));
        for index in 1..batch.len() {
            if batch[index].stream == batch[index - 1].stream {
                match random_below(4) {
                    // A chain link: the next version after the link before it.
                    0 => batch[index].continues = true,
                    // The same command id again in the same batch.
                    1 => batch[index].command = batch[index - 1].command,
                    _ => {}
                }
            }
        }
        let per_append = run_batch(&mut connection, &batch, Writer::PerAppend).await.expect("cqrs_append_batch");
        let set_based = run_batch(&mut connection, &batch, Writer::SetBased).await.expect("cqrs_append_arrays");
        assert_eq!(set_based, per_append, "round {round}: the two functions differ");
        for answer in &per_append.answers {
            seen.insert(answer.1.clone());
        }
        // Write it for real (set-based) as the next round's state.
        arrays_call(
            "SELECT * FROM cqrs_append_arrays($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            &batch,
        )
        .fetch_all(&mut connection)
        .await
        .expect("commit a batch");
        for append in &batch {
            if let Some(command) = append.command {
                stored_commands.push((append.stream.clone(), command));
            }
        }
    }
    for outcome in ["appended", "duplicate", "conflict", "skipped"] {
        assert!(seen.contains(outcome), "no batch had an append answered {outcome:?}: {seen:?}");
    }
    drop(store);
}

/// The writer's statement for a lone append of one event against `cqrs_append_batch`, on random
/// appends over a few streams (new and existing ones, every kind of expected version, command
/// ids stored before, event ids stored before, with and without tags): where the statement
/// decides (`appended`, `duplicate`) the same answer and the same rows; where it does not
/// (`undecided`), nothing written, and the function's answer is one the statement leaves to it
/// (a conflict or a reused event id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_event_statement_answers_and_writes_like_the_per_append_loop() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let mut connection = db.connection().await;
    let names = ["a", "b", "ä"];
    let mut stored = Stored::default();
    let mut seen = std::collections::HashSet::new();
    for round in 0..200 {
        let versions = stream_versions(&mut connection).await;
        let stream = names[random_below(names.len() as u64) as usize].to_owned();
        let version = versions.get(&stream).copied().unwrap_or(0);
        let (kind, expected) = random_expectation(version);
        let command = random_command(&stored.commands, &stream);
        let id = stored.random_event_id();
        let batch = [RawAppend {
            stream,
            kind,
            expected,
            command,
            continues: false,
            events: vec![(id, "T".to_owned(), json!({"round": round}))],
            // None, or one to three from a few, a tag sometimes twice.
            tags: (0..random_below(4)).map(|_| ["x", "y", "a:1"][random_below(3) as usize].to_owned()).collect(),
            condition: None,
        }];
        let per_append = run_batch(&mut connection, &batch, Writer::PerAppend).await.expect("cqrs_append_batch");
        let single = run_batch(&mut connection, &batch, Writer::SingleEvent).await.expect("single-event statement");
        let outcome = single.answers[0].1.as_str();
        seen.insert(outcome.to_owned());
        if outcome == "undecided" {
            let left = per_append.answers[0].1.as_str();
            assert!(
                matches!(left, "conflict" | "duplicate_event_id"),
                "round {round}: undecided, where the function answered {left:?}"
            );
            assert!(single.events.is_empty(), "round {round}: an undecided append wrote events");
            seen.insert(format!("undecided: {left}"));
        } else {
            assert_eq!(single, per_append, "round {round}: the statement and the function differ");
            if !batch[0].tags.is_empty() {
                seen.insert(format!("{outcome}, tagged"));
            }
        }
        stored.commit(&mut connection, &batch).await;
    }
    for outcome in ["appended", "appended, tagged", "duplicate", "undecided: conflict", "undecided: duplicate_event_id"]
    {
        assert!(seen.contains(outcome), "no append was answered {outcome:?}: {seen:?}");
    }
    drop(store);
}

/// `cqrs_append_conditional` against `cqrs_append_batch`, on random conditional appends of one
/// event over a few streams (every kind of expected version, command ids and event ids stored
/// before, tags or none) with random conditions (one or two items of types, tags or both, after
/// the head or an earlier position): the same answers and the same rows, append after append.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conditional_function_answers_and_writes_like_the_per_append_loop() {
    let db = TestDb::create().await;
    let store = db.store().await;
    let mut connection = db.connection().await;
    let names = ["a", "b", "ä"];
    let pick = |from: &[&str]| from[random_below(from.len() as u64) as usize].to_owned();
    let mut stored = Stored::default();
    let mut seen = std::collections::HashSet::new();
    for round in 0..250 {
        let versions = stream_versions(&mut connection).await;
        let head: i64 = sqlx::query_scalar("SELECT coalesce(max(position), 0) FROM cqrs_events")
            .fetch_one(&mut connection)
            .await
            .expect("head");
        let stream = pick(&names);
        let (kind, expected) = random_expectation(versions.get(&stream).copied().unwrap_or(0));
        let command = random_command(&stored.commands, &stream);
        let id = stored.random_event_id();
        let items: Vec<serde_json::Value> = (0..1 + random_below(2))
            .map(|_| {
                let types: Vec<String> = (0..random_below(2)).map(|_| pick(&["T", "U"])).collect();
                let tags: Vec<String> = (0..random_below(3)).map(|_| pick(&["x", "y", "a:1"])).collect();
                json!({"t": types, "g": tags})
            })
            .collect();
        let after = if random_below(2) == 0 { head } else { random_below(head as u64 + 1) as i64 };
        let batch = [RawAppend {
            stream,
            kind,
            expected,
            command,
            continues: false,
            events: vec![(id, pick(&["T", "U"]), json!({"round": round}))],
            tags: (0..random_below(3)).map(|_| pick(&["x", "y", "a:1"])).collect(),
            condition: Some((after, json!(items))),
        }];
        let per_append = run_batch(&mut connection, &batch, Writer::PerAppend).await.expect("cqrs_append_batch");
        let lean = run_batch(&mut connection, &batch, Writer::Conditional).await.expect("cqrs_append_conditional");
        assert_eq!(lean, per_append, "round {round}: the two functions differ");
        seen.insert(per_append.answers[0].1.clone());
        stored.commit(&mut connection, &batch).await;
    }
    for outcome in ["appended", "duplicate", "conflict", "condition_failed", "duplicate_event_id"] {
        assert!(seen.contains(outcome), "no append was answered {outcome:?}: {seen:?}");
    }
    drop(store);
}

/// The command ids and event ids the single-append comparisons have stored, to send again.
#[derive(Default)]
struct Stored {
    commands: Vec<(String, uuid::Uuid)>,
    ids: Vec<uuid::Uuid>,
}

impl Stored {
    /// A new event id, or one time in six one stored before.
    fn random_event_id(&self) -> uuid::Uuid {
        match random_below(6) {
            0 if !self.ids.is_empty() => self.ids[random_below(self.ids.len() as u64) as usize],
            _ => uuid::Uuid::new_v4(),
        }
    }

    /// Writes a batch of one append with `cqrs_append_batch` and commits it, as the next round's
    /// state; remembers its command id and event ids if it was appended.
    async fn commit(&mut self, connection: &mut sqlx::PgConnection, batch: &[RawAppend]) {
        use sqlx::Row;
        let rows = sqlx::query("SELECT outcome FROM cqrs_append_batch($1)")
            .bind(sqlx::types::Json(batch_json(batch)))
            .fetch_all(connection)
            .await
            .expect("commit a batch");
        let appended = |row: &sqlx::postgres::PgRow| row.try_get::<&str, _>("outcome").is_ok_and(|o| o == "appended");
        for (append, row) in batch.iter().zip(&rows) {
            if appended(row) {
                if let Some(command) = append.command {
                    self.commands.push((append.stream.clone(), command));
                }
                self.ids.extend(append.events.iter().map(|event| event.0));
            }
        }
    }
}

/// A batch as `cqrs_append_batch` takes it.
fn batch_json(batch: &[RawAppend]) -> Vec<serde_json::Value> {
    batch
        .iter()
        .map(|a| {
            let events: Vec<_> = a
                .events
                .iter()
                .map(|(id, t, p)| {
                    let g = a.tags.join("\u{1f}");
                    json!({"id": id, "t": t, "sv": 1, "p": p, "ca": null, "co": null, "h": {"h": "1"}, "g": g})
                })
                .collect();
            let mut item =
                json!({"s": a.stream, "e": a.kind, "v": a.expected, "c": a.command, "k": a.continues, "ev": events});
            if let Some((after, items)) = &a.condition {
                item["q"] = json!({"a": after, "i": items});
            }
            item
        })
        .collect()
}

/// Every stream's version.
async fn stream_versions(connection: &mut sqlx::PgConnection) -> std::collections::HashMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("SELECT stream_id, version FROM cqrs_streams")
        .fetch_all(connection)
        .await
        .expect("versions")
        .into_iter()
        .collect()
}

/// A random expected version for a stream at `version`: any, no stream, exists, or exactly one
/// below, at or above it.
fn random_expectation(version: i64) -> (&'static str, Option<i64>) {
    match random_below(5) {
        0 => ("any", None),
        1 => ("no_stream", None),
        2 => ("exists", None),
        _ => ("exact", Some((version + random_below(3) as i64 - 1).max(0))),
    }
}

/// No command id, a new one, or (if `stream` has one) a command id stored before on it.
fn random_command(stored: &[(String, uuid::Uuid)], stream: &str) -> Option<uuid::Uuid> {
    match random_below(4) {
        0 => None,
        1 if !stored.is_empty() => {
            let (s, c) = &stored[random_below(stored.len() as u64) as usize];
            (s == stream).then_some(*c).or(Some(uuid::Uuid::new_v4()))
        }
        _ => Some(uuid::Uuid::new_v4()),
    }
}

/// `sql` (a call of `cqrs_append_arrays` with `$1`…`$16`) with the batch bound as its arrays.
fn arrays_call<'q>(
    sql: &'q str,
    batch: &[RawAppend],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let events: Vec<(i32, &RawAppend, &(uuid::Uuid, String, serde_json::Value))> = batch
        .iter()
        .enumerate()
        .flat_map(|(index, append)| append.events.iter().map(move |event| (index as i32 + 1, append, event)))
        .collect();
    sqlx::query(sql)
        .bind(batch.iter().map(|a| a.stream.clone()).collect::<Vec<_>>())
        .bind(batch.iter().map(|a| a.kind).collect::<Vec<_>>())
        .bind(batch.iter().map(|a| a.expected).collect::<Vec<_>>())
        .bind(batch.iter().map(|a| a.command).collect::<Vec<_>>())
        .bind(batch.iter().map(|a| a.continues).collect::<Vec<_>>())
        .bind(batch.iter().map(|a| a.events.len() as i32).collect::<Vec<_>>())
        .bind(events.iter().map(|(index, _, _)| *index).collect::<Vec<_>>())
        .bind(events.iter().map(|(_, append, _)| append.stream.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|(_, append, _)| append.command).collect::<Vec<_>>())
        .bind(events.iter().map(|(_, _, event)| event.0).collect::<Vec<_>>())
        .bind(events.iter().map(|(_, _, event)| event.1.clone()).collect::<Vec<_>>())
        .bind(events.iter().map(|_| 1i32).collect::<Vec<_>>())
        .bind(events.iter().map(|(_, _, event)| sqlx::types::Json(event.2.clone())).collect::<Vec<_>>())
        .bind(events.iter().map(|_| None::<uuid::Uuid>).collect::<Vec<_>>())
        .bind(events.iter().map(|_| None::<uuid::Uuid>).collect::<Vec<_>>())
        .bind(events.iter().map(|_| sqlx::types::Json(json!({"h": "1"}))).collect::<Vec<_>>())
}

/// Appends round `round` of [`events_read_from_memory_equal_the_stored_ones`]: one to three
/// events carrying `payload` and full metadata, as one append; returns how many.
async fn append_round(writer: PgEventStore, round: u64, payload: serde_json::Value) -> usize {
    use cqrs_core::{CausationId, CommandId, CorrelationId, Metadata};

    let events: Vec<_> = (0..1 + round % 3)
        .map(|n| {
            let mut metadata = Metadata {
                command_id: Some(CommandId::new()),
                causation_id: (n == 0).then(|| CausationId(uuid::Uuid::new_v4())),
                correlation_id: Some(CorrelationId(uuid::Uuid::new_v4())),
                ..Metadata::default()
            };
            metadata.headers.insert("tenant".to_owned(), format!("t{round}"));
            let mut sent = cqrs_core::testing::conformance::event_with(round * 10 + n, metadata);
            sent.payload = payload.clone();
            sent
        })
        .collect();
    // The command id of an append is its first event's (the store checks they agree).
    let command = events[0].metadata.command_id;
    let events = events
        .into_iter()
        .map(|mut event| {
            event.metadata.command_id = command;
            event
        })
        .collect::<Vec<_>>();
    let count = events.len();
    writer.append(&stream(&format!("mem{}", round % 4)), ExpectedVersion::Any, events).await.expect("append");
    count
}

/// Cuts the test database off: it refuses new connections, and every session is ended.
async fn cut_off(db: &TestDb) {
    let database: String = {
        let mut connection = db.connection().await;
        sqlx::query_scalar("SELECT current_database()").fetch_one(&mut connection).await.expect("name")
    };
    let mut admin = <sqlx::PgConnection as sqlx::Connection>::connect(&crate::support::server_url())
        .await
        .expect("connect to the server");
    sqlx::query(&format!("ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false"))
        .execute(&mut admin)
        .await
        .expect("refuse connections");
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&database)
        .execute(&mut admin)
        .await
        .expect("end the sessions");
}

/// Events a subscriber of the writing process gets from memory (`PgStoreConfig::recent_events`)
/// are exactly what the database returns for them: lone appends, batches, several events per
/// append, metadata, payloads that jsonb stores differently from how they were written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_read_from_memory_equal_the_stored_ones() {
    use cqrs_core::Position;

    let db = TestDb::create().await;
    let writer = db.store().await;
    let from_database = db.store_with(PgStoreConfig::default().with_max_connections(4).with_recent_events(0)).await;
    let payloads = [
        json!({"z": 1, "a": [1.5, -0.0, 1e300, 18446744073709551615u64], "é": "ünïcödé ✓", "nested": {"b": null}}),
        json!("a bare string"),
        json!([{"k": true}, 12345678901234567i64]),
    ];
    let mut appended = 0;
    let mut tasks = Vec::new();
    for round in 0..12u64 {
        let payload = payloads[(round % 3) as usize].clone();
        tasks.push(tokio::spawn(append_round(writer.clone(), round, payload)));
    }
    for task in tasks {
        appended += task.await.expect("task");
    }
    let theirs = read_everything(&from_database).await;
    assert_eq!(theirs.len(), appended);
    // Page by page from the writing store, with the database refusing connections and every
    // session ended: only memory can answer (one writer, no other process, so the positions
    // form one run from 1).
    cut_off(&db).await;
    assert!(writer.read_all(Position::START, 1).await.is_ok(), "position 1 is in memory");
    assert!(
        writer.read_stream(&stream("absent"), cqrs_core::Version(1), 1).await.is_err(),
        "the database is out of reach"
    );
    let mut position = Position::START;
    let mut ours = Vec::new();
    while ours.len() < appended {
        let page = writer.read_all(position, 5).await.expect("read from memory");
        let Some(last) = page.last() else { break };
        position = last.position;
        ours.extend(page);
    }
    assert_eq!(ours, theirs, "memory and database disagree");
}
