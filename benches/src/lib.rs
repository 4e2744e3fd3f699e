//! Holder crate for the workspace benchmarks in `benches/`; see BENCHMARKS.md.
