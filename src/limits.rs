//! Fixed limits that are not configuration: they follow from the formats we
//! store into (LMDB keys are at most 511 bytes) or protect the process from a
//! single request. Configurable limits live in `config/`.

/// Longest event type, in bytes.
pub const EVENT_TYPE_BYTES_MAX: usize = 256;
/// Longest client-supplied event id, in bytes (an LMDB key).
pub const EVENT_ID_BYTES_MAX: usize = 128;
/// Longest stream name, in bytes (an LMDB key).
pub const STREAM_NAME_BYTES_MAX: usize = 256;
/// Most headers one request may carry; more gets 431.
pub const REQUEST_HEADERS_MAX: usize = 64;
/// Read buffer a connection starts with; it grows up to `server.max_header_bytes`
/// for heads and to the body size for bodies, and shrinks back when idle.
pub const CONN_READ_BUFFER_BYTES: usize = 4096;
/// A connection's buffers above this are released once the request is answered.
pub const CONN_BUFFER_KEEP_BYTES: usize = 64 * 1024;
/// Rows per LMDB transaction while rebuilding the index from SQLite.
pub const INDEX_REBUILD_ROWS_PER_TXN: usize = 100_000;
/// Most old events one group commit deletes under `storage.retain_events`:
/// pruning rides along with commits in bounded slices instead of stalling one.
pub const PRUNE_ROWS_PER_COMMIT: u64 = 1000;
/// How often an idle writer prunes stores under `storage.retain_age` (with
/// appends, pruning rides along with each commit instead).
pub const RETAIN_AGE_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);
/// Most slices (of `PRUNE_ROWS_PER_COMMIT`) one idle sweep prunes, each its
/// own transaction: a backlog drains in steps without holding the writer.
pub const RETAIN_AGE_SWEEP_SLICES_MAX: usize = 100;
/// Keys shorter than this start with a warning (ebuse takes any key).
pub const API_KEY_BYTES_MIN: usize = 8;
/// Readiness fails when the database's disk has less free than this.
pub const READY_DISK_FREE_BYTES_MIN: u64 = 64 * 1024 * 1024;
/// How long a shard runs SSE subscribers before it polls the kernel for
/// completions and lets its connections run (the SSE task queue's
/// `Latency::Matters`; glommio's preempt timer is 100 ms otherwise). A
/// commit's fan-out to 10,000 subscribers takes ~100 ms of one core: polling
/// every 2 ms inside it lets publishers' next requests in and answered
/// meanwhile, so the subscribers still to be written take several events in
/// one write. It applies only while subscribers have work: a 2 ms preempt
/// timer for the whole shard collapsed batch ingestion (100 connections of
/// 100-event batches: 7,000 req/s at 5 or 10 ms, 1,400 at 3 ms, 350 at 2 ms;
/// cause inside glommio's rings, not found), and at 10 ms one event at a
/// time fanned out 3.4x nchan instead of 12x.
pub const SSE_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);
/// CPU shares of a shard's SSE subscribers (their own glommio task queue)
/// against everything else on the shard (connections, the writer's answers,
/// timers: the default queue, 1000 shares). Equal shares split a busy core in
/// half, and a fan-out round delays a request by at most a poll interval
/// instead of the whole round.
pub const SSE_TASK_SHARES: usize = 1000;
/// How often each shard ends the SSE streams whose subscription token has
/// expired: an expired token's stream ends within this of its `exp`.
pub const TOKEN_EXPIRY_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// How long a new token subscription waits for the shard that counts its
/// user (`sse.max_per_user`) before it is refused with 503 (that shard is
/// stopping).
pub const USER_COUNT_ASK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Messages the writer's inbox holds per shard. A shard sends one message
/// per wakeup and waits for its answers before more pile up (its queue is
/// bounded by `writer.queue_*`), so this only smooths bursts of wakeups.
pub const WRITER_INBOX_MESSAGES_PER_SHARD: usize = 64;
/// How long a reload waits for a shard to let go of a removed tenant's
/// LMDB environment before it gives up on re-adding it, and how often it looks.
pub const RELOAD_INDEX_RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
pub const RELOAD_INDEX_RELEASE_POLL: std::time::Duration = std::time::Duration::from_millis(20);
/// The least `Retry-After` for conditions that last longer than a full queue
/// (a tenant whose storage is unavailable, an SSE cap, a shard that is
/// stopping): `writer.retry_after_secs` (1 s by default) is sized for a queue
/// that drains in milliseconds.
pub const RETRY_AFTER_LASTING_SECS_MIN: u32 = 5;
/// Between looks while a shard drains at shutdown: for connections to finish,
/// then for its queue to the writer to empty.
pub const DRAIN_CONNECTIONS_POLL: std::time::Duration = std::time::Duration::from_millis(10);
pub const DRAIN_QUEUE_POLL: std::time::Duration = std::time::Duration::from_millis(1);
/// How long `accept` pauses after a failure: longer when out of file
/// descriptors (they come back only as connections close), so a full fd
/// table does not spin the loop.
pub const ACCEPT_RETRY_AFTER_EMFILE: std::time::Duration = std::time::Duration::from_millis(50);
pub const ACCEPT_RETRY_AFTER_ERROR: std::time::Duration = std::time::Duration::from_millis(5);

/// LMDB's largest key, in bytes (its default `MDB_MAXKEYSIZE`).
pub const LMDB_KEY_BYTES_MAX: usize = 511;

// Relations the numbers above must keep, checked when compiling.
// Event ids, stream names and consumer ids are LMDB keys; a stream's
// per-version key adds a 2-byte length and an 8-byte version (index::stream_key).
const _: () = assert!(EVENT_ID_BYTES_MAX <= LMDB_KEY_BYTES_MAX);
const _: () = assert!(STREAM_NAME_BYTES_MAX + 2 + 8 <= LMDB_KEY_BYTES_MAX);
// A connection's starting buffer is one it keeps.
const _: () = assert!(CONN_READ_BUFFER_BYTES <= CONN_BUFFER_KEEP_BYTES);
// The SSE queue polls more often than glommio's default preempt timer (100 ms),
// or it would change nothing.
const _: () = assert!(SSE_POLL_INTERVAL.as_millis() < 100);
// Tokens carry whole seconds: an expired one ends within a check of `exp`.
const _: () = assert!(TOKEN_EXPIRY_CHECK_INTERVAL.as_secs() <= 1);
// Each wait loop looks more than once before it gives up.
const _: () =
    assert!(RELOAD_INDEX_RELEASE_POLL.as_millis() * 2 <= RELOAD_INDEX_RELEASE_WAIT.as_millis());
const _: () =
    assert!(ACCEPT_RETRY_AFTER_ERROR.as_millis() <= ACCEPT_RETRY_AFTER_EMFILE.as_millis());
// A sweep takes whole slices: at least one.
const _: () = assert!(RETAIN_AGE_SWEEP_SLICES_MAX >= 1 && PRUNE_ROWS_PER_COMMIT >= 1);

// Cluster mode (docs/cluster.md).

/// A replica whose store failed to apply a log message tries again after
/// this, serving scrapes and readiness meanwhile; the log waits for it.
pub const LOG_APPLY_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Most JetStream messages the consumer hands the writer in one message.
pub const LOG_BATCH_MESSAGES_MAX: usize = 256;
/// Log batches waiting for the writer; beyond, the consumer waits (and
/// stops pulling from JetStream).
pub const LOG_INBOX_BATCHES: usize = 64;
/// Bytes of a JetStream message kept for its headers and framing: what the
/// node encodes stays this far below the server's `max_payload`.
pub const LOG_MESSAGE_OVERHEAD_BYTES: usize = 1024;
/// Between publish attempts of one message (same `Nats-Msg-Id`, so
/// JetStream keeps one) until `cluster.publish_timeout`.
pub const LOG_PUBLISH_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
/// Between attempts to reach JetStream and set up a stream or consumer.
pub const LOG_SETUP_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
const _: () = assert!(LOG_BATCH_MESSAGES_MAX >= 1 && LOG_INBOX_BATCHES >= 1);
/// JetStream publishes awaiting their acknowledgement, per node; beyond,
/// publishing waits (the shards' queues then fill and shed with 503).
pub const LOG_PUBLISHES_IN_FLIGHT_MAX: usize = 4096;
/// How often the cluster thread asks JetStream for each stream's state
/// (readiness, lag), and whether NATS is connected.
pub const LOG_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);
/// JetStream's duplicate window on the streams it creates: a publish
/// retried (same `Nats-Msg-Id`) within it is kept once. It only needs to
/// outlast `cluster.publish_timeout`'s retries; idempotency by event id is
/// the replica's own and permanent.
pub const LOG_DUPLICATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(120);
/// A JetStream pull waits at most this; its idle heartbeats come at half
/// of it. A consumer whose server died is noticed after two missed beats.
pub const LOG_PULL_EXPIRES: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the cluster thread looks for acknowledged appends its replica
/// has not applied within `cluster.publish_timeout` (answered 503).
pub const LOG_UNAPPLIED_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// Bytes of log messages one JetStream pull asks for, about (messages per
/// pull = this / the server's max_payload, at least 2).
pub const LOG_PULL_BYTES_MAX: usize = 16 * 1024 * 1024;
/// A consumer that delivered nothing for this long while the stream holds
/// more (twice in a row) is made again.
pub const LOG_STALL_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
