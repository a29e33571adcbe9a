//! Every integration test, in one binary: the harness (`common`) is
//! compiled once, not once per file. Each module starts the real
//! `shardcast` binary as users do and talks HTTP (or SSE) to it; the module
//! docs say what each covers.
//!
//! `cargo test --test it` runs them all; `cargo test --test it sse::` one
//! module.

mod common;

mod admission;
mod api;
mod bench_smoke;
mod browser;
mod cli;
mod cluster;
mod durability;
mod ebuse;
mod fanout;
mod framing;
mod fuzz_corpus;
mod hostile;
mod http;
mod layout;
mod ops;
mod profiles;
mod reads;
mod sse;
mod startup;
mod tenants;
mod tokens;
