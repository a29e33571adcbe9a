//! One JetStream message's payload: the requests one node took for one
//! tenant in one wakeup, validated there (ids and timestamps assigned), in
//! a compact binary form every node decodes to the same requests.
//!
//! ```text
//! message  := version:u8 (=1) count:u32 request*
//! request  := kind:u8 (0 one, 1 batch, 2 consumer position)
//!             consumer: id:str position:u64
//!             else:     count:u32 event*
//! event    := id:str type:str data:bytes timestamp:str flags:u8
//!             [stream:str] [expected_version:u64] [metadata:bytes]
//!             (flags: 1 stream, 2 expected_version, 4 metadata)
//! str, bytes := len:u32 then that many bytes (str: UTF-8)
//! ```
//!
//! Integers are little-endian. Decoding never trusts a count: it refuses
//! what the remaining bytes cannot hold, so a damaged or foreign message is
//! an error, never a panic or a large allocation (fuzzed: `log_message`).

use crate::event::NewEvent;
use crate::tenant::TenantId;
use crate::writer::{AppendKind, AppendRequest};

const VERSION: u8 = 1;
const FLAG_STREAM: u8 = 1;
const FLAG_EXPECTED: u8 = 2;
const FLAG_METADATA: u8 = 4;
/// The fewest bytes an event takes (four empty lengths and the flags).
const EVENT_BYTES_MIN: usize = 4 * 4 + 1;
/// The fewest bytes a request takes (its kind and a count).
const REQUEST_BYTES_MIN: usize = 1 + 4;

/// Bytes `req` adds to a message.
pub fn encoded_len(req: &AppendRequest) -> usize {
    let mut n = 1;
    if let (AppendKind::Consumer, Some((id, _))) = (req.kind, &req.consumer) {
        return n + 4 + id.len() + 8;
    }
    n += 4;
    for e in &req.events {
        n += 4 * 4 + e.id.len() + e.event_type.len() + e.data.len() + e.timestamp.len() + 1;
        n += e.stream.as_ref().map_or(0, |s| 4 + s.len());
        n += e.expected_version.map_or(0, |_| 8);
        n += e.metadata.as_ref().map_or(0, |m| 4 + m.len());
    }
    n
}

/// The header of a message of `count` requests.
pub const HEADER_BYTES: usize = 1 + 4;

/// Encode `requests` as one message.
pub fn encode<'a>(requests: impl ExactSizeIterator<Item = &'a AppendRequest>, out: &mut Vec<u8>) {
    out.push(VERSION);
    put_u32(out, requests.len());
    for req in requests {
        match (req.kind, &req.consumer) {
            (AppendKind::Consumer, Some((id, position))) => {
                out.push(2);
                put_bytes(out, id.as_bytes());
                out.extend_from_slice(&position.to_le_bytes());
            }
            (kind, _) => {
                out.push(if kind == AppendKind::One { 0 } else { 1 });
                put_u32(out, req.events.len());
                for e in &req.events {
                    put_bytes(out, e.id.as_bytes());
                    put_bytes(out, e.event_type.as_bytes());
                    put_bytes(out, &e.data);
                    put_bytes(out, e.timestamp.as_bytes());
                    let flags = (e.stream.is_some() as u8 * FLAG_STREAM)
                        | (e.expected_version.is_some() as u8 * FLAG_EXPECTED)
                        | (e.metadata.is_some() as u8 * FLAG_METADATA);
                    out.push(flags);
                    if let Some(s) = &e.stream {
                        put_bytes(out, s.as_bytes());
                    }
                    if let Some(v) = e.expected_version {
                        out.extend_from_slice(&v.to_le_bytes());
                    }
                    if let Some(m) = &e.metadata {
                        put_bytes(out, m);
                    }
                }
            }
        }
    }
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    // Every length is bounded far below 4 GiB (bodies by server.max_body_bytes).
    let n = u32::try_from(n).expect("lengths in a log message fit in 32 bits");
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, b.len());
    out.extend_from_slice(b);
}

/// Why a payload is not a message of this format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

/// Decode a message into the requests it carries, for `tenant`, each with
/// ticket 0 (the caller gives its own requests theirs back).
pub fn decode(payload: &[u8], tenant: TenantId) -> Result<Vec<AppendRequest>, DecodeError> {
    let mut r = Reader { b: payload };
    let version = r.u8()?;
    if version != VERSION {
        return Err(DecodeError(format!(
            "format version {version}, this node reads {VERSION}"
        )));
    }
    let count = r.count(REQUEST_BYTES_MIN)?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let kind = r.u8()?;
        let req = match kind {
            2 => {
                let id = r.str()?;
                let position = r.u64()?;
                AppendRequest {
                    ticket: 0,
                    tenant,
                    kind: AppendKind::Consumer,
                    events: Vec::new(),
                    consumer: Some((id, position)),
                }
            }
            0 | 1 => {
                let n = r.count(EVENT_BYTES_MIN)?;
                if kind == 0 && n != 1 {
                    return Err(DecodeError(format!(
                        "a single-event request with {n} events"
                    )));
                }
                let mut events = Vec::with_capacity(n);
                for _ in 0..n {
                    events.push(r.event()?);
                }
                AppendRequest {
                    ticket: 0,
                    tenant,
                    kind: if kind == 0 {
                        AppendKind::One
                    } else {
                        AppendKind::Batch
                    },
                    events,
                    consumer: None,
                }
            }
            k => return Err(DecodeError(format!("unknown request kind {k}"))),
        };
        out.push(req);
    }
    if !r.b.is_empty() {
        return Err(DecodeError(format!(
            "{} bytes after the last request",
            r.b.len()
        )));
    }
    Ok(out)
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.b.len() < n {
            return Err(DecodeError(format!(
                "cut short: {n} bytes wanted, {} left",
                self.b.len()
            )));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    /// A count of items at least `each` bytes long, which the rest must hold.
    fn count(&mut self, each: usize) -> Result<usize, DecodeError> {
        let n = self.u32()?;
        if n.saturating_mul(each) > self.b.len() {
            return Err(DecodeError(format!(
                "{n} items cannot fit in the {} bytes left",
                self.b.len()
            )));
        }
        Ok(n)
    }
    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        let n = self.u32()?;
        Ok(self.take(n)?.to_vec())
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        String::from_utf8(self.bytes()?).map_err(|_| DecodeError("text is not UTF-8".into()))
    }
    fn event(&mut self) -> Result<NewEvent, DecodeError> {
        let id = self.str()?;
        let event_type = self.str()?;
        let data = self.bytes()?;
        let timestamp = self.str()?;
        let flags = self.u8()?;
        if flags & !(FLAG_STREAM | FLAG_EXPECTED | FLAG_METADATA) != 0 {
            return Err(DecodeError(format!("unknown event flags {flags:#x}")));
        }
        let stream = if flags & FLAG_STREAM != 0 {
            Some(self.str()?)
        } else {
            None
        };
        let expected_version = if flags & FLAG_EXPECTED != 0 {
            Some(self.u64()?)
        } else {
            None
        };
        let metadata = if flags & FLAG_METADATA != 0 {
            Some(self.bytes()?)
        } else {
            None
        };
        Ok(NewEvent {
            id,
            event_type,
            data,
            timestamp,
            stream,
            expected_version,
            metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(i: u64, stream: bool, meta: bool) -> NewEvent {
        NewEvent {
            id: format!("id-{i}"),
            event_type: "order.placed".into(),
            data: format!("{{\"n\":{i}}}").into_bytes(),
            timestamp: "2026-11-30T12:00:00Z".into(),
            stream: stream.then(|| format!("order-{i}")),
            expected_version: stream.then_some(i),
            metadata: meta.then(|| b"{\"by\":\"me\"}".to_vec()),
        }
    }

    fn requests() -> Vec<AppendRequest> {
        let t = 3;
        vec![
            AppendRequest {
                ticket: 0,
                tenant: t,
                kind: AppendKind::One,
                events: vec![event(1, false, false)],
                consumer: None,
            },
            AppendRequest {
                ticket: 0,
                tenant: t,
                kind: AppendKind::Batch,
                events: (2..6).map(|i| event(i, i % 2 == 0, i % 3 == 0)).collect(),
                consumer: None,
            },
            AppendRequest {
                ticket: 0,
                tenant: t,
                kind: AppendKind::Consumer,
                events: vec![],
                consumer: Some(("billing".into(), 42)),
            },
        ]
    }

    fn same(a: &[AppendRequest], b: &[AppendRequest]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.kind, y.kind);
            assert_eq!(x.tenant, y.tenant);
            assert_eq!(x.events, y.events);
            assert_eq!(x.consumer, y.consumer);
        }
    }

    #[test]
    fn round_trip_and_length() {
        let reqs = requests();
        let mut out = Vec::new();
        encode(reqs.iter(), &mut out);
        let expected: usize = HEADER_BYTES + reqs.iter().map(encoded_len).sum::<usize>();
        assert_eq!(out.len(), expected, "encoded_len predicts the size exactly");
        same(&decode(&out, 3).unwrap(), &reqs);
    }

    #[test]
    fn refuses_damage() {
        let mut out = Vec::new();
        encode(requests().iter(), &mut out);
        // Every cut is refused, never a panic.
        for n in 0..out.len() {
            assert!(decode(&out[..n], 0).is_err(), "cut at {n}");
        }
        let mut trailing = out.clone();
        trailing.push(0);
        assert!(decode(&trailing, 0).is_err());
        let mut v2 = out.clone();
        v2[0] = 2;
        assert!(decode(&v2, 0).unwrap_err().0.contains("version 2"));
        // A count no payload could hold is refused before allocating.
        let huge = [1u8, 0xff, 0xff, 0xff, 0xff];
        assert!(decode(&huge, 0).unwrap_err().0.contains("cannot fit"));
    }

    proptest! {
        #[test]
        fn any_events_round_trip(
            ids in proptest::collection::vec("[a-z0-9-]{0,12}", 1..20),
            data in proptest::collection::vec(any::<u8>(), 0..64),
            version in any::<u64>(),
        ) {
            let events: Vec<NewEvent> = ids.iter().enumerate().map(|(i, id)| NewEvent {
                id: id.clone(),
                event_type: format!("t{i}"),
                data: data.clone(),
                timestamp: "2026-01-01T00:00:00Z".into(),
                stream: (i % 2 == 0).then(|| id.clone()),
                expected_version: (i % 3 == 0).then_some(version),
                metadata: (i % 4 == 0).then(|| data.clone()),
            }).collect();
            let req = AppendRequest { ticket: 0, tenant: 1, kind: AppendKind::Batch, events, consumer: None };
            let mut out = Vec::new();
            encode(std::iter::once(&req), &mut out);
            prop_assert_eq!(out.len(), HEADER_BYTES + encoded_len(&req));
            let back = decode(&out, 1).unwrap();
            prop_assert_eq!(&back[0].events, &req.events);
        }

        #[test]
        fn any_bytes_decode_without_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&b, 0);
        }
    }
}
