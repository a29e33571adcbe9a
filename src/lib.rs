//! shardcast: an event store that takes events over HTTP, commits them
//! durably, and pushes them live to Server-Sent-Events clients.
//!
//! The data path, a folder per stage (`ls src/` reads as this map; no
//! top-level module refers back to one above it: `tests/it/layout.rs`):
//!
//! ```text
//!  client ──TCP──▶ server/accept      one SO_REUSEPORT socket per shard, one shard
//!                   │                  per core; admission (shard/admission: 503
//!                   │                  beyond the connection cap, request unread)
//!                  server/connection  keep-alive, pipelining, timeouts; per-client
//!                   │                  rate limit (ratelimit); heads, bodies and
//!                   │                  answers as values (http)
//!                  api                route table; auth once per request (api/auth:
//!                   │                  key → tenant + role (tenant), or subscription
//!                   │                  token → tenant + scope (token, filter));
//!                   │                  handlers return a Reply (reads, writes, ops)
//!                   │   ├─ lookups: LMDB index (storage/index), no locks
//!                   │   └─ reads: SQLite on the reader pool (storage/reader);
//!                   │      long replays a page at a time (api/replay)
//!                  shard              per-core state; its writer client queues
//!                   │                  appends → one flume message per wakeup
//!                  writer             one thread: check ids/versions, one SQLite
//!                   │                  transaction per tenant per wakeup
//!                   │                  (writer/store, storage), commit, then LMDB,
//!                   │                  then answer (writer/protocol: every message)
//!                   ▼
//!                  shard              wakes each waiting request → 200 after commit
//!                   │                  and puts the committed events in its ring
//!                  shard/fanout       a commit wakes the subscribers it matches
//!                                      (index by type, stream, prefix); each
//!                                      subscriber task: cursor into the ring, one
//!                                      write per wakeup; behind it → SQLite
//! ```
//!
//! Cluster mode (`cluster`, docs/cluster.md): between shard and writer sits
//! NATS JetStream. The shards' requests go to the `shardcast-nats` thread,
//! which publishes one message per tenant per wakeup; every node follows
//! the stream in order and its writer applies each message with the same
//! rules, so every node holds the same history.
//!
//! Beside the path, `storage/checkpoint` copies the WAL into the database on
//! its own thread, so no commit waits for a checkpoint's fsync; `metrics`
//! sums the shards' and the writer's own counters when scraped; `cli` holds
//! the operator's commands (check, backup, config, token), `import` bringing
//! an ebuse installation across. docs/architecture.md has the long version
//! of this map.
//!
//! `config` holds every setting (raw TOML → validated `Config`), `limits` the
//! fixed ones (their relations checked when compiling), `server` the process
//! lifecycle and each shard's executor (`server/executor`), `log` logging
//! that cannot panic or flood, `ids` event ids and tenant numbers; `bench`
//! and `soak` the load tools (`shardcast bench sse`, `shardcast bench soak`),
//! `fuzzing` the fuzz targets' oracles.

pub mod api;
pub mod bench;
pub mod cli;
pub mod cluster;
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
