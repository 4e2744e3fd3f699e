//! Integration tests of cqrs-memory, in one binary: the shared store conformance suite. The
//! framework's behaviour tests, which run on this store, live in `cqrs-core/tests/it/`.

mod conformance;
