//! PostgreSQL event store for `cqrs-core` (work in progress).
