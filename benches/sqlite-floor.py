#!/usr/bin/env python3
"""The floor of SQLite sequential appends set by the store's schema, not by our code.

Runs, in one thread through Python's sqlite3 module (no sqlx worker thread, no tokio, no
framework), with the store's durability (WAL, synchronous=FULL) and its real schema (the
migrations of cqrs-sqlite), one commit per "command":

- anchor: the plain INSERT+COMMIT of a 200-byte JSON row that `compare` uses as its anchor;
- variants of one append of one event, each in BEGIN IMMEDIATE ... COMMIT: the event row
  alone; with the reads our writer makes (what the store does for a command); and with the
  stream-version and command-id rows the schema also wrote before one row per event.

Prints each rate and its ratio to the anchor measured around it. The ratio of "the store's
writes" is the most our sequential case can reach against the anchor without changing what is
written.

    python3 benches/sqlite-floor.py [seconds per variant, default 3] [rounds, default 2]
"""

import glob
import json
import os
import sqlite3
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MIGRATIONS = sorted(glob.glob(os.path.join(HERE, "..", "cqrs-sqlite", "migrations", "*.sql")))
PAYLOAD = json.dumps({"chat_id": "chat-1", "sender": "alice", "text": "x" * 150})


def fresh(directory, name):
    connection = sqlite3.connect(os.path.join(directory, name), isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=FULL")
    return connection


def uuid_v7():
    """16 bytes of a time-ordered UUID, as the store's ids are."""
    millis = int(time.time() * 1000)
    rand = os.urandom(10)
    return millis.to_bytes(6, "big") + bytes([0x70 | (rand[0] & 0x0F), rand[1], (rand[2] & 0x3F) | 0x80]) + rand[3:]


def anchor(directory, name, seconds):
    connection = fresh(directory, name + ".db")
    connection.execute("CREATE TABLE anchor_rows (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)")
    count, started = 0, time.time()
    while time.time() - started < seconds:
        connection.execute("INSERT INTO anchor_rows (payload) VALUES (?)", (PAYLOAD,))
        count += 1
    connection.close()
    return count / (time.time() - started)


# The two tables the schema wrote besides the event row until one row per event
# (20261208000001_one_row_per_event.sql), as they were: measured to show what dropping them gave.
THREE_ROW_TABLES = """
CREATE TABLE old_streams (stream_id TEXT PRIMARY KEY, version INTEGER NOT NULL) STRICT, WITHOUT ROWID;
CREATE TABLE old_commands (
    command_id BLOB NOT NULL, stream_id TEXT NOT NULL, first_version INTEGER NOT NULL,
    last_version INTEGER NOT NULL, first_position INTEGER NOT NULL, last_position INTEGER NOT NULL,
    recorded_at INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (command_id, stream_id)
) STRICT, WITHOUT ROWID;
CREATE INDEX old_commands_recorded_at ON old_commands (recorded_at);
"""


def append(directory, name, seconds, reads, three_rows):
    connection = fresh(directory, name + ".db")
    for migration in MIGRATIONS:
        connection.executescript(open(migration).read())
    if three_rows:
        connection.executescript(THREE_ROW_TABLES)
    count, started, version = 0, time.time(), 0
    while time.time() - started < seconds:
        connection.execute("BEGIN IMMEDIATE")
        command_id = uuid_v7()
        if reads:
            # What the writer reads per append: the next position, the stream's version from
            # its key, the command id among the stream's events past the pruning horizon.
            position = connection.execute("SELECT coalesce(max(position), 0) + 1 FROM cqrs_events").fetchone()[0]
            connection.execute("SELECT coalesce(max(version), 0) FROM cqrs_events WHERE stream_id = ?",
                               ("chat-1",)).fetchone()
            connection.execute(
                "SELECT min(version), max(version), min(position), max(position) FROM cqrs_events "
                "WHERE stream_id = ? AND command_id = ? AND position > "
                "(SELECT position FROM cqrs_command_horizon) HAVING count(*) > 0",
                ("chat-1", command_id),
            ).fetchall()
        else:
            position = version + 1
        version += 1
        now = int(time.time() * 1e6)
        connection.execute(
            "INSERT INTO cqrs_events (position, event_id, stream_id, version, event_type, schema_version, payload, "
            "command_id, causation_id, correlation_id, headers, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (position, uuid_v7(), "chat-1", version, "MessageSent", 1, PAYLOAD, command_id, command_id, command_id,
             "{}", now),
        )
        if three_rows:
            connection.execute(
                "INSERT INTO old_streams (stream_id, version) VALUES (?, ?) "
                "ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version",
                ("chat-1", version),
            )
            connection.execute(
                "INSERT INTO old_commands (stream_id, command_id, first_version, last_version, first_position, "
                "last_position, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                ("chat-1", command_id, version, version, position, position, now),
            )
        connection.execute("COMMIT")
        count += 1
    connection.close()
    return count / (time.time() - started)


VARIANTS = [
    ("event row", dict(reads=False, three_rows=False)),
    ("the store's writes", dict(reads=True, three_rows=False)),
    ("three rows (until 12-08)", dict(reads=True, three_rows=True)),
]


def main():
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    print(f"sqlite {sqlite3.sqlite_version}, WAL, synchronous=FULL, {seconds:g} s per variant")
    for round_ in range(1, rounds + 1):
        with tempfile.TemporaryDirectory(prefix="sqlite-floor.") as directory:
            before = anchor(directory, "anchor-before", seconds)
            rates = [(name, append(directory, f"variant{index}", seconds, **flags))
                     for index, (name, flags) in enumerate(VARIANTS)]
            after = anchor(directory, "anchor-after", seconds)
        mean = (before + after) / 2
        print(f"round {round_}: anchor {before:.0f} / {after:.0f} commits/s")
        for name, rate in rates:
            print(f"  {name:<26} {rate:6.0f} commits/s  {rate / mean:.2f}x the anchor")


if __name__ == "__main__":
    main()
