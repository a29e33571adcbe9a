//! The shard's side of the writer: a local queue, drained by one flusher task
//! into one message per wakeup, and tickets answered when the writer's
//! message comes back (`Shard::committed`).

use crate::config::Config;
use crate::tenant::TenantId;
use crate::writer::{AppendKind, AppendRequest, Outcome, ToWriter};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

struct Ticket {
    outcome: RefCell<Option<Outcome>>,
    waker: Cell<Option<Waker>>,
    bytes: usize,
}

pub struct WriterClient {
    shard: usize,
    tx: RefCell<Option<flume::Sender<ToWriter>>>,
    queue: RefCell<Vec<AppendRequest>>,
    flusher: Cell<Option<Waker>>,
    tickets: RefCell<HashMap<u64, Rc<Ticket>>>,
    next_ticket: Cell<u64>,
    in_flight_bytes: Cell<usize>,
    requests_max: usize,
    bytes_max: usize,
    batch_events_max: usize,
}

pub enum Submit {
    Queued(Pending),
    /// The queue is full: answer 503 with Retry-After.
    Shed,
    /// The shard is shutting down and no longer talks to the writer.
    Stopped,
}

/// Resolves to the request's outcome once the writer has committed it.
pub struct Pending {
    ticket: Rc<Ticket>,
}

impl Future for Pending {
    type Output = Outcome;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
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
            tickets: RefCell::new(HashMap::new()),
            next_ticket: Cell::new(0),
            in_flight_bytes: Cell::new(0),
            requests_max: cfg.writer.queue_requests_max,
            bytes_max: cfg.writer.queue_bytes_max,
            batch_events_max: cfg.writer.batch_events_max,
        }
    }

    pub fn in_flight(&self) -> usize {
        self.tickets.borrow().len()
    }

    /// Queue a request for the writer. `bytes` is the body size, which bounds
    /// the memory the queue may hold.
    pub fn submit(
        &self,
        tenant: TenantId,
        kind: AppendKind,
        events: Vec<crate::event::NewEvent>,
        bytes: usize,
    ) -> Submit {
        self.submit_request(tenant, kind, events, None, bytes)
    }

    /// Queue a consumer position for the writer to store.
    pub fn submit_consumer(&self, tenant: TenantId, id: String, position: u64) -> Submit {
        let bytes = id.len() + 16;
        self.submit_request(
            tenant,
            AppendKind::Consumer,
            Vec::new(),
            Some((id, position)),
            bytes,
        )
    }

    fn submit_request(
        &self,
        tenant: TenantId,
        kind: AppendKind,
        events: Vec<crate::event::NewEvent>,
        consumer: Option<(String, u64)>,
        bytes: usize,
    ) -> Submit {
        if self.tx.borrow().is_none() {
            return Submit::Stopped;
        }
        let in_flight = self.tickets.borrow().len();
        if in_flight >= self.requests_max
            || (in_flight > 0 && self.in_flight_bytes.get() + bytes > self.bytes_max)
        {
            return Submit::Shed;
        }
        let id = self.next_ticket.get();
        self.next_ticket.set(id + 1);
        let ticket = Rc::new(Ticket {
            outcome: RefCell::new(None),
            waker: Cell::new(None),
            bytes,
        });
        self.tickets.borrow_mut().insert(id, ticket.clone());
        self.in_flight_bytes.set(self.in_flight_bytes.get() + bytes);
        self.queue.borrow_mut().push(AppendRequest {
            ticket: id,
            tenant,
            kind,
            events,
            consumer,
        });
        if let Some(w) = self.flusher.take() {
            w.wake();
        }
        Submit::Queued(Pending { ticket })
    }

    pub fn answer(&self, ticket: u64, outcome: Outcome) {
        if let Some(t) = self.tickets.borrow_mut().remove(&ticket) {
            // Each ticket's bytes were added when it was queued, once.
            debug_assert!(
                self.in_flight_bytes.get() >= t.bytes,
                "in-flight bytes would go negative"
            );
            self.in_flight_bytes
                .set(self.in_flight_bytes.get() - t.bytes);
            *t.outcome.borrow_mut() = Some(outcome);
            if let Some(w) = t.waker.take() {
                w.wake();
            }
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
                    Outcome::Failed {
                        message: "the writer has stopped".into(),
                        full: false,
                    },
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
