//! The shard's side of the writer: a local queue, drained by one flusher task
//! into one message per wakeup, and tickets answered when the writer's
//! message comes back (`Shard::committed`).

use crate::config::Config;
use crate::tenant::TenantId;
use crate::writer::{AppendKind, AppendRequest, Outcome, PositionOutcome, Reply, ToWriter};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// A request waiting for its answer, of the type its kind gets.
struct Ticket<T> {
    outcome: RefCell<Option<T>>,
    waker: Cell<Option<Waker>>,
    bytes: usize,
}

impl<T> Ticket<T> {
    fn new(bytes: usize) -> Rc<Ticket<T>> {
        Rc::new(Ticket {
            outcome: RefCell::new(None),
            waker: Cell::new(None),
            bytes,
        })
    }

    fn fill(&self, outcome: T) {
        *self.outcome.borrow_mut() = Some(outcome);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

pub struct WriterClient {
    shard: usize,
    tx: RefCell<Option<flume::Sender<ToWriter>>>,
    queue: RefCell<Vec<AppendRequest>>,
    flusher: Cell<Option<Waker>>,
    /// Appends and position saves waiting for the writer, apart: each is
    /// answered with its own kind of outcome.
    appends: RefCell<HashMap<u64, Rc<Ticket<Outcome>>>>,
    positions: RefCell<HashMap<u64, Rc<Ticket<PositionOutcome>>>>,
    next_ticket: Cell<u64>,
    in_flight_bytes: Cell<usize>,
    requests_max: usize,
    bytes_max: usize,
    batch_events_max: usize,
}

pub enum Submit<T> {
    Queued(Pending<T>),
    /// The queue is full: answer 503 with Retry-After.
    Shed,
    /// The shard is shutting down and no longer talks to the writer.
    Stopped,
}

/// Resolves to the request's outcome once the writer has committed it.
pub struct Pending<T> {
    ticket: Rc<Ticket<T>>,
}

impl<T> Future for Pending<T> {
    type Output = T;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        match self.ticket.outcome.borrow_mut().take() {
            Some(o) => Poll::Ready(o),
            None => {
                self.ticket.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

impl WriterClient {
    pub fn new(shard: usize, tx: flume::Sender<ToWriter>, cfg: &Config) -> WriterClient {
        WriterClient {
            shard,
            tx: RefCell::new(Some(tx)),
            queue: RefCell::new(Vec::new()),
            flusher: Cell::new(None),
            appends: RefCell::new(HashMap::new()),
            positions: RefCell::new(HashMap::new()),
            next_ticket: Cell::new(0),
            in_flight_bytes: Cell::new(0),
            requests_max: cfg.writer.queue_requests_max,
            bytes_max: cfg.writer.queue_bytes_max,
            batch_events_max: cfg.writer.batch_events_max,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.appends.borrow().len() + self.positions.borrow().len()
    }

    /// Queue an append (one event or a batch) for the writer. `bytes` is
    /// the body size, which bounds the memory the queue may hold.
    pub fn submit(
        &self,
        tenant: TenantId,
        kind: AppendKind,
        events: Vec<crate::event::NewEvent>,
        bytes: usize,
    ) -> Submit<Outcome> {
        debug_assert!(
            kind != AppendKind::Consumer,
            "positions go by submit_consumer"
        );
        let Some(id) = self.admit(bytes) else {
            return self.refusal();
        };
        let ticket = Ticket::new(bytes);
        self.appends.borrow_mut().insert(id, ticket.clone());
        self.enqueue(AppendRequest {
            ticket: id,
            tenant,
            kind,
            events,
            consumer: None,
        });
        Submit::Queued(Pending { ticket })
    }

    /// Queue a consumer position for the writer to store.
    pub fn submit_consumer(
        &self,
        tenant: TenantId,
        id: String,
        position: u64,
    ) -> Submit<PositionOutcome> {
        let bytes = id.len() + 16;
        let Some(ticket_id) = self.admit(bytes) else {
            return self.refusal();
        };
        let ticket = Ticket::new(bytes);
        self.positions
            .borrow_mut()
            .insert(ticket_id, ticket.clone());
        self.enqueue(AppendRequest {
            ticket: ticket_id,
            tenant,
            kind: AppendKind::Consumer,
            events: Vec::new(),
            consumer: Some((id, position)),
        });
        Submit::Queued(Pending { ticket })
    }

    /// A ticket number for a request of `bytes`, when the queue has room
    /// and the writer is there.
    fn admit(&self, bytes: usize) -> Option<u64> {
        if self.tx.borrow().is_none() {
            return None;
        }
        let in_flight = self.in_flight();
        if in_flight >= self.requests_max
            || (in_flight > 0 && self.in_flight_bytes.get() + bytes > self.bytes_max)
        {
            return None;
        }
        let id = self.next_ticket.get();
        self.next_ticket.set(id + 1);
        self.in_flight_bytes.set(self.in_flight_bytes.get() + bytes);
        Some(id)
    }

    /// Why `admit` said no.
    fn refusal<T>(&self) -> Submit<T> {
        if self.tx.borrow().is_none() {
            Submit::Stopped
        } else {
            Submit::Shed
        }
    }

    fn enqueue(&self, request: AppendRequest) {
        self.queue.borrow_mut().push(request);
        if let Some(w) = self.flusher.take() {
            w.wake();
        }
    }

    /// The writer's answer to one ticket: to the waiting append or position
    /// save, as its kind (a ticket is only ever in one of the two tables).
    pub fn answer(&self, ticket: u64, reply: Reply) {
        let bytes = match reply {
            Reply::Append(o) => self.appends.borrow_mut().remove(&ticket).map(|t| {
                t.fill(o);
                t.bytes
            }),
            Reply::Position(o) => self.positions.borrow_mut().remove(&ticket).map(|t| {
                t.fill(o);
                t.bytes
            }),
        };
        if let Some(bytes) = bytes {
            // Each ticket's bytes were added when it was queued, once.
            debug_assert!(
                self.in_flight_bytes.get() >= bytes,
                "in-flight bytes would go negative"
            );
            self.in_flight_bytes.set(self.in_flight_bytes.get() - bytes);
        }
    }

    /// Wait until something is queued, then take it all.
    async fn next_batch(&self) -> Vec<AppendRequest> {
        std::future::poll_fn(|cx| {
            let mut q = self.queue.borrow_mut();
            if q.is_empty() {
                self.flusher.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(std::mem::take(&mut *q))
            }
        })
        .await
    }

    /// The flusher: one message to the writer per wakeup, each at most one
    /// group commit's worth of events.
    pub async fn run_flusher(&self) {
        loop {
            let batch = self.next_batch().await;
            let mut chunk = Vec::new();
            let mut events = 0;
            for req in batch {
                let n = req.events.len();
                if events + n > self.batch_events_max && !chunk.is_empty() {
                    self.send(std::mem::take(&mut chunk)).await;
                    events = 0;
                }
                events += n;
                chunk.push(req);
            }
            if !chunk.is_empty() {
                self.send(chunk).await;
            }
        }
    }

    async fn send(&self, requests: Vec<AppendRequest>) {
        let tx = self.tx.borrow().clone();
        let result = match tx {
            Some(tx) => tx
                .send_async(ToWriter {
                    shard: self.shard,
                    requests,
                })
                .await
                .map_err(|e| e.into_inner().requests),
            None => Err(requests),
        };
        if let Err(requests) = result {
            for r in requests {
                self.answer(
                    r.ticket,
                    Reply::failed(
                        r.kind,
                        "the writer has stopped".into(),
                        crate::writer::Failure::Storage,
                    ),
                );
            }
        }
    }

    /// Hang up on the writer: it finishes once every shard has.
    /// Whether requests wait in the queue, not yet sent to the writer.
    pub fn queue_is_empty(&self) -> bool {
        self.queue.borrow().is_empty()
    }

    /// Hang up on the writer (the shard stopped): it finishes once every
    /// shard has.
    pub fn close(&self) {
        self.tx.borrow_mut().take();
    }
}
