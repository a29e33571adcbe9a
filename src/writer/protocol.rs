//! Every message between the shards and the writer, in one place: a
//! shard's queued requests go over in one `ToWriter` per wakeup; the writer
//! answers each shard with one `FromWriter` per group commit, carrying its
//! answers and every tenant's committed events; the process talks to the
//! writer with `WriterControl`.

use crate::event::{Event, NewEvent};
use crate::tenant::TenantId;
use std::sync::Arc;

/// What a request asks for; decides the shape of its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendKind {
    /// `POST /events`: answered with the stored event.
    One,
    /// `POST /events/batch`: all or nothing, answered with a summary.
    Batch,
    /// `POST|PUT /subscriptions/{id}/position`: no events; `consumer` is set.
    Consumer,
}

/// One HTTP request's events, on their way to the writer.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    /// Shard-local number the answer is matched back by.
    pub ticket: u64,
    /// Whose storage it goes to.
    pub tenant: TenantId,
    pub kind: AppendKind,
    pub events: Vec<NewEvent>,
    /// For `AppendKind::Consumer`: the consumer id and the position to save.
    pub consumer: Option<(String, u64)>,
}

/// Cluster mode: the shard of a request another node published. Nobody here
/// waits for its answer.
pub const FOREIGN: usize = usize::MAX;

/// Cluster mode, log → writer: messages of one tenant's JetStream stream,
/// in stream order, each applied once with the single-node rules.
#[derive(Debug, Clone)]
pub struct FromLog {
    pub tenant: TenantId,
    pub entries: Vec<LogEntry>,
}

/// One JetStream message: one node's requests of one wakeup. A request
/// this node published carries its shard (and ticket), so its answer goes
/// back once applied; another node's carries `FOREIGN`.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub seq: u64,
    pub requests: Vec<(usize, AppendRequest)>,
    /// The message as it is in the log (`codec`; shared, not copied) and
    /// each request's (shard, ticket) when this node published it: what
    /// rebuilds `requests` if this node's store fails to apply them (the
    /// commit consumes them).
    pub payload: bytes::Bytes,
    pub origins: Vec<(usize, u64)>,
}

impl LogEntry {
    /// This entry without its decoded requests (cheap: the payload is shared).
    pub fn skeleton(&self) -> LogEntry {
        LogEntry {
            seq: self.seq,
            requests: Vec::new(),
            payload: self.payload.clone(),
            origins: self.origins.clone(),
        }
    }

    /// Decode the requests again from the payload, as the consumer did.
    pub fn rebuild(&mut self, tenant: TenantId) {
        if !self.requests.is_empty() {
            return;
        }
        self.requests = with_origins(
            super::codec::decode(&self.payload, tenant).unwrap_or_default(),
            &self.origins,
        );
    }
}

/// A message's decoded requests with their origins: this node's own get
/// their shard and ticket back (when the counts agree), others `FOREIGN`.
pub fn with_origins(
    decoded: Vec<AppendRequest>,
    origins: &[(usize, u64)],
) -> Vec<(usize, AppendRequest)> {
    if origins.len() != decoded.len() {
        return decoded.into_iter().map(|r| (FOREIGN, r)).collect();
    }
    decoded
        .into_iter()
        .zip(origins)
        .map(|(mut r, (shard, ticket))| {
            r.ticket = *ticket;
            (*shard, r)
        })
        .collect()
}

/// Shard → writer: every request a shard queued since its last message.
#[derive(Debug)]
pub struct ToWriter {
    pub shard: usize,
    pub requests: Vec<AppendRequest>,
}

/// The answer to an append (one event, or a batch).
#[derive(Debug)]
pub enum Outcome {
    One {
        event: Event,
        duplicate: bool,
    },
    Batch {
        saved: usize,
        duplicates: usize,
        first_position: u64,
        last_position: u64,
    },
    /// `expected_version` did not match; nothing of the request was written.
    Conflict {
        stream: String,
        expected: u64,
        current: u64,
    },
    /// Nothing of the request was written, for `cause`.
    Failed {
        message: String,
        cause: Failure,
    },
}

/// Why a write was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Storage refused it: 503, to retry after a delay.
    Storage,
    /// The disk, the database's size cap or the index map is full: 507.
    Full,
    /// Cluster mode: JetStream did not take it within
    /// `cluster.publish_timeout` (no quorum, NATS unreachable): 503.
    LogUnavailable,
    /// Cluster mode: the request alone is larger than one JetStream
    /// message may be (the server's `max_payload`): 413.
    TooLarge { limit_bytes: usize },
}

/// The answer to saving a consumer position.
#[derive(Debug)]
pub enum PositionOutcome {
    Saved,
    /// The position was not saved, for `cause`.
    Failed {
        message: String,
        cause: Failure,
    },
}

/// One request's answer, shaped by what it asked: a shard's ticket for an
/// append can only be answered with an `Outcome`, one for a position with a
/// `PositionOutcome`.
#[derive(Debug)]
pub enum Reply {
    Append(Outcome),
    Position(PositionOutcome),
}

impl Reply {
    /// A request of this kind failed: nothing of it was written.
    pub fn failed(kind: AppendKind, message: String, cause: Failure) -> Reply {
        match kind {
            AppendKind::Consumer => Reply::Position(PositionOutcome::Failed { message, cause }),
            AppendKind::One | AppendKind::Batch => {
                Reply::Append(Outcome::Failed { message, cause })
            }
        }
    }
}

/// One tenant's events made durable by one commit, in position order,
/// contiguous, following that tenant's previous ones.
#[derive(Debug)]
pub struct Published {
    pub tenant: TenantId,
    pub events: Vec<Event>,
}

/// Writer → shard: one message per shard per wakeup, with the answers to
/// that shard's requests and every tenant's committed events (shared by
/// every shard: each encodes them once into that tenant's SSE ring).
#[derive(Debug)]
pub struct FromWriter {
    pub replies: Vec<(u64, Reply)>,
    pub events: Arc<Vec<Published>>,
}

/// The process → writer: tenants come and go on reload. `done` is answered
/// once the writer holds (or has closed) the store, so shards are told
/// about a new tenant only when its appends can be served.
pub enum WriterControl {
    Add {
        id: TenantId,
        store: Box<super::Store>,
        done: flume::Sender<()>,
    },
    Remove {
        id: TenantId,
        done: flume::Sender<()>,
    },
    /// A scrape: the writer's counters.
    Metrics(flume::Sender<crate::metrics::WriterSnapshot>),
    /// Readiness: each tenant's storage, ready or why not.
    Ready(flume::Sender<Vec<(String, Result<(), String>)>>),
}
