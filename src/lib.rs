//! shardcast: an event store that takes events over HTTP, commits them
//! durably, and pushes them live to Server-Sent-Events clients.
//!
//! The data path, one module per stage:
//!
//! ```text
//!  client ──TCP──▶ accept   one SO_REUSEPORT socket per shard, one shard per core;
//!                   │        connection cap (503 beyond it, request unread)
//!                  http     parse, keep-alive, pipelining, timeouts, JSON errors;
//!                   │        per-client rate limit (ratelimit: 429 + Retry-After)
//!                  route    endpoint, key → tenant + role (tenant), or a
//!                   │         subscription token → tenant + scope (token, filter);
//!                   │         limits; parse events (event)
//!                   │         ├─ lookups: LMDB index (index), no locks
//!                   │         └─ reads: SQLite on the reader pool (reader);
//!                   │            long replays a page at a time (replay)
//!                  shard    per-core queue → one flume message per wakeup
//!                   │
//!                  writer   one thread: check ids/versions (index), one SQLite
//!                   │        transaction per tenant per wakeup (storage), commit, then
//!                   │        update LMDB and answer: one message per shard
//!                   ▼
//!                  shard    wakes each waiting request → 200 after commit
//!                   │        and puts the committed events in its ring
//!                  sse      a commit wakes the subscribers it matches (index
//!                            by type, stream, prefix); each: cursor into the
//!                            ring, one write per wakeup; behind it → SQLite
//! ```
//!
//! Beside the path, `checkpoint` copies the WAL into the database on its own
//! thread, so no commit waits for a checkpoint's fsync; `metrics` sums the
//! shards' and the writer's own counters when scraped; `cli` holds the
//! operator's commands (check, backup, config), `import` bringing an ebuse
//! installation across. docs/architecture.md has the
//! long version of this map.
//!
//! `config` holds every setting (raw TOML → validated `Config`), `limits` the
//! fixed ones, `server` the process lifecycle, `log` logging that cannot
//! panic or flood; `bench` and `soak` the load tools (`shardcast bench sse`,
//! `shardcast bench soak`), `fuzzing` the fuzz targets' oracles.

pub mod api;
pub mod bench;
pub mod cli;
pub mod config;
pub mod event;
pub mod filter;
pub mod fuzzing;
pub mod http;
pub mod ids;
pub mod import;
pub mod limits;
pub mod log;
pub mod metrics;
pub mod ratelimit;
pub mod server;
pub mod shard;
pub mod soak;
pub mod storage;
pub mod tenant;
pub mod token;
pub mod writer;
