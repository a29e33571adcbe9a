//! Live fan-out over Server-Sent Events, per shard.
//!
//! After each commit the writer sends the committed events once to every
//! shard (in the same message as that shard's answers). The shard encodes
//! each event into its SSE frame once and keeps the newest `sse.ring_events`
//! frames in a ring (`Fanout`), indexed by type and stream (`index`). Each
//! subscriber is a task with a cursor (the last position it was sent); it
//! waits in an index keyed by what it follows, so a commit wakes only the
//! subscribers with a new matching event. A woken subscriber gathers its
//! frames (found by key) into one buffer and writes it in one write. A
//! subscriber whose cursor is older than the ring is served from SQLite
//! through the reader pool, a page at a time, until the ring covers it
//! again: the cursor is a position, so the switch has no gap and no repeat.
//!
//! Nothing here is shared with another core: `Rc`, `Cell`, `RefCell`.

use crate::event::Event;
pub use index::{Filter, Frame, Pattern};
use index::{Ring, Waiters};
pub use subscriber::{expiry_loop, heartbeat_loop, serve, subscription, Start, Subscription, User};

mod index;
mod subscriber;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Encode one event as an SSE message: `id:` its position, `event:` its type,
/// `data:` the stored event as JSON. The JSON is one line unless `data` held
/// raw line breaks between tokens (JSON strings cannot hold them), in which
/// case each line becomes its own `data:` line, as the WHATWG spec joins them
/// back with `\n`. A line ends, for an EventSource, at CRLF, a lone LF or a
/// lone CR alike, so all three split here (the JSON comes back with `\n`
/// where a CR stood: whitespace either way).
pub fn encode_frame(out: &mut Vec<u8>, e: &Event) {
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(itoa::Buffer::new().format(e.position).as_bytes());
    out.extend_from_slice(b"\nevent: ");
    // A type is free text: a line break in it would end the field early.
    for c in e.new.event_type.bytes() {
        out.push(if c == b'\n' || c == b'\r' { b' ' } else { c });
    }
    let mut json = Vec::with_capacity(96 + e.new.data.len());
    crate::event::encode_event(&mut json, e, false);
    let mut rest = &json[..];
    loop {
        let end = rest
            .iter()
            .position(|c| *c == b'\n' || *c == b'\r')
            .unwrap_or(rest.len());
        out.extend_from_slice(b"\ndata: ");
        out.extend_from_slice(&rest[..end]);
        if end == rest.len() {
            break;
        }
        let brk = if rest[end..].starts_with(b"\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + brk..];
    }
    out.extend_from_slice(b"\n\n");
}

/// The shard's ring of frames (one tenant's) and the subscribers waiting
/// on it, both indexed by what subscribers follow (`index`).
pub struct Fanout {
    /// Whose events these are (a token subscriber gives its per-user place
    /// back under it).
    pub(super) tenant: crate::tenant::TenantId,
    pub(super) ring: RefCell<Ring>,
    /// Position of the newest event this shard has seen (its start head when none).
    pub(super) last: Cell<u64>,
    pub(super) waiting: RefCell<Waiters>,
    pub(super) next_sub: Cell<u64>,
    pub(super) heartbeat: Cell<u64>,
    pub subscribers: Cell<usize>,
    pub(super) per_key: RefCell<HashMap<Box<[u8]>, usize>>,
    pub slow_clients: Cell<u64>,
    pub delivered: Cell<u64>,
    /// The tenant was removed: every subscriber ends.
    pub(super) closed: Cell<bool>,
    /// Token subscribers by expiry (Unix seconds, subscriber id): the
    /// expiry check wakes those whose token has run out.
    pub(super) expiring: RefCell<std::collections::BTreeSet<(u64, u64)>>,
    /// Where a woken subscriber gathers its frames. One per shard: a
    /// subscriber uses it only between two awaits, so no allocation per
    /// delivery and none held by idle subscribers.
    pub(super) scratch: RefCell<Vec<u8>>,
}

impl Fanout {
    pub fn new(tenant: crate::tenant::TenantId, start_head: u64, ring_max: usize) -> Fanout {
        Fanout {
            tenant,
            ring: RefCell::new(Ring::new(ring_max)),
            last: Cell::new(start_head),
            waiting: RefCell::new(Waiters::default()),
            next_sub: Cell::new(0),
            heartbeat: Cell::new(0),
            subscribers: Cell::new(0),
            per_key: RefCell::new(HashMap::new()),
            slow_clients: Cell::new(0),
            delivered: Cell::new(0),
            closed: Cell::new(false),
            expiring: RefCell::new(std::collections::BTreeSet::new()),
            scratch: RefCell::new(Vec::new()),
        }
    }

    pub fn last(&self) -> u64 {
        self.last.get()
    }

    /// The oldest position the ring still holds (`last + 1` when empty).
    pub(super) fn first(&self) -> u64 {
        self.ring.borrow().first().unwrap_or(self.last.get() + 1)
    }

    /// Add a commit's events and wake the subscribers that want one of them.
    pub fn publish(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if self.subscribers.get() == 0 {
            // Nobody to encode for: an empty ring makes a later subscriber
            // catch up from SQLite instead, so ingestion pays nothing here.
            let newest = events[events.len() - 1].position;
            if newest > self.last.get() {
                assert!(
                    events[0].position <= self.last.get() + 1,
                    "fan-out positions must be contiguous"
                );
                self.ring.borrow_mut().clear();
                self.last.set(newest);
            }
            return;
        }
        let mut ring = self.ring.borrow_mut();
        let mut waiting = self.waiting.borrow_mut();
        for e in events {
            // A commit that landed before this shard read its start head.
            if e.position <= self.last.get() {
                continue;
            }
            // Cursors skip nothing only if the ring has no holes.
            assert_eq!(
                e.position,
                self.last.get() + 1,
                "fan-out positions must be contiguous"
            );
            let mut bytes = Vec::with_capacity(128 + e.new.data.len());
            encode_frame(&mut bytes, e);
            let frame = Frame {
                position: e.position,
                event_type: e.new.event_type.as_str().into(),
                stream: e.new.stream.as_deref().map(Into::into),
                bytes: bytes.into_boxed_slice(),
            };
            waiting.publish(&frame);
            ring.push(frame);
            self.last.set(e.position);
        }
    }

    /// The tenant is gone (reload): end every subscription.
    pub fn close(&self) {
        self.closed.set(true);
        self.waiting.borrow().wake_all();
    }

    /// Wake the subscribers whose token expired by `now` (each ends its
    /// stream with `event: token_expired` when it runs).
    pub fn expire(&self, now: u64) {
        let mut expiring = self.expiring.borrow_mut();
        while let Some(&(at, id)) = expiring.first() {
            if at > now {
                break;
            }
            expiring.pop_first();
            self.waiting.borrow_mut().expire(id);
        }
    }

    /// The heartbeat: every idle subscriber writes a comment line.
    pub fn beat(&self) {
        self.heartbeat.set(self.heartbeat.get() + 1);
        self.waiting.borrow().wake_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::NewEvent;

    fn ev(position: u64, t: &str, data: &str) -> Event {
        Event {
            position,
            stream_version: None,
            new: NewEvent {
                id: format!("id-{position}"),
                event_type: t.into(),
                data: data.as_bytes().to_vec(),
                timestamp: "2026-01-01T00:00:00Z".into(),
                stream: None,
                expected_version: None,
                metadata: None,
            },
        }
    }

    #[test]
    fn frames_have_id_event_and_data_lines() {
        let mut out = Vec::new();
        encode_frame(&mut out, &ev(7, "order.placed", r#"{"a":1}"#));
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("id: 7\nevent: order.placed\ndata: {\"position\":7,"));
        assert!(s.ends_with("}\n\n"));
        assert_eq!(s.matches("\ndata: ").count(), 1);
    }

    #[test]
    fn line_breaks_in_data_become_several_data_lines() {
        let mut out = Vec::new();
        encode_frame(&mut out, &ev(1, "t\nx", "{\n  \"a\": 1\r\n}"));
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("event: t x\n"), "{s}");
        assert_eq!(s.matches("\ndata: ").count(), 3, "{s}");
        assert!(!s.contains('\r'));
        // Joined back as the spec does, the data lines are the JSON again.
        let joined: Vec<&str> = s.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        let v: serde_json::Value = serde_json::from_str(&joined.join("\n")).unwrap();
        assert_eq!(v["data"]["a"], 1);
    }

    /// The WHATWG event-stream parser's line and field rules (§9.2.6):
    /// lines end at CRLF, LF or CR; `data` fields join with LF.
    fn whatwg_data(stream: &[u8]) -> Vec<String> {
        let text = String::from_utf8(stream.to_vec()).unwrap();
        let mut events = Vec::new();
        let mut data: Option<String> = None;
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let end = rest.find(['\r', '\n']).unwrap_or(rest.len());
            let line = &rest[..end];
            let brk = if rest[end..].starts_with("\r\n") {
                2
            } else {
                1.min(rest.len() - end)
            };
            rest = &rest[end + brk..];
            if line.is_empty() {
                events.extend(data.take());
            } else if let Some(v) = line.strip_prefix("data") {
                let v = v.strip_prefix(':').unwrap_or("");
                let v = v.strip_prefix(' ').unwrap_or(v);
                match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(v);
                    }
                    None => data = Some(v.to_string()),
                }
            }
        }
        events
    }

    #[test]
    fn every_kind_of_line_break_in_data_is_split() {
        for data in [
            "{\"a\":\r1}",
            "{\r\"a\":1\r}",
            "{\"a\":\r\n1\n}",
            "\r\r\n\n{\"a\":1}\r",
        ] {
            let mut out = Vec::new();
            encode_frame(&mut out, &ev(3, "t", data));
            let got = whatwg_data(&out);
            assert_eq!(
                got.len(),
                1,
                "{data:?} → {:?}",
                String::from_utf8_lossy(&out)
            );
            let v: serde_json::Value = serde_json::from_str(&got[0])
                .unwrap_or_else(|e| panic!("{data:?}: {e}: {:?}", got[0]));
            assert_eq!(v["data"]["a"], 1);
            assert_eq!(v["position"], 3);
        }
        // The oracle itself: a lone CR inside one data line would cut it.
        let cut = whatwg_data(b"data: {\"a\":\r1}\n\n");
        assert!(serde_json::from_str::<serde_json::Value>(&cut[0]).is_err());
    }

    #[test]
    fn the_ring_keeps_the_newest_and_stays_contiguous() {
        let f = Fanout::new(0, 10, 16);
        assert_eq!(f.first(), 11);
        f.subscribers.set(1); // with none, nothing is encoded at all
        let evs: Vec<Event> = (8..=40).map(|p| ev(p, "t", "1")).collect();
        f.publish(&evs); // 8..=10 were before the start head: skipped
        assert_eq!(f.last(), 40);
        assert_eq!(f.first(), 25);
    }
}
