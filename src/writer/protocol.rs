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
#[derive(Debug)]
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
    /// Storage failed; nothing of the request was written. `full`: the
    /// disk, the database's size cap or the index map is full (507).
    Failed {
        message: String,
        full: bool,
    },
}

/// The answer to saving a consumer position.
#[derive(Debug)]
pub enum PositionOutcome {
    Saved,
    /// Storage failed; the position was not saved (`full`: 507).
    Failed {
        message: String,
        full: bool,
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
    /// Storage failed for a request of this kind: nothing of it was written.
    pub fn failed(kind: AppendKind, message: String, full: bool) -> Reply {
        match kind {
            AppendKind::Consumer => Reply::Position(PositionOutcome::Failed { message, full }),
            AppendKind::One | AppendKind::Batch => Reply::Append(Outcome::Failed { message, full }),
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
