//! Events as they travel the data path: parsed and validated on the shard that
//! received them (`NewEvent`), positioned by the writer (`Event`), and encoded
//! back to JSON for responses.
//!
//! `data` and `metadata` are kept as the exact bytes the client sent: a client
//! reads back what it wrote, byte for byte. serde_json parses bodies, with
//! `RawValue` spans for those two. (A simd-json path, measured slower at
//! every body size here and found by fuzzing to accept text that is not
//! JSON, such as `1e3<8` or a NUL after a number, was removed.)

use crate::limits::{EVENT_ID_BYTES_MAX, EVENT_TYPE_BYTES_MAX, STREAM_NAME_BYTES_MAX};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::borrow::Cow;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// An event that has been validated but not yet stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEvent {
    pub id: String,
    pub event_type: String,
    /// Raw JSON bytes of `data` (`null` when absent).
    pub data: Vec<u8>,
    /// RFC 3339 in UTC, as stored and returned.
    pub timestamp: String,
    pub stream: Option<String>,
    pub expected_version: Option<u64>,
    /// Raw JSON bytes of `metadata`, when given.
    pub metadata: Option<Vec<u8>>,
}

/// A stored event: a `NewEvent` with the place the writer gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub position: u64,
    pub stream_version: Option<u64>,
    pub new: NewEvent,
}

/// Why a body was refused; each maps to a 400 with this code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventError {
    pub code: &'static str,
    pub message: String,
}

fn bad(code: &'static str, message: impl Into<String>) -> EventError {
    EventError {
        code,
        message: message.into(),
    }
}

/// Per-shard source of ids and wall-clock time for events that bring neither.
pub struct Stamp {
    ids: crate::ids::IdGen,
    now: Option<String>,
}

impl Stamp {
    pub fn new(ids: crate::ids::IdGen) -> Stamp {
        Stamp { ids, now: None }
    }
    /// The request's timestamp, computed once per request and shared by all its events.
    fn now(&mut self) -> String {
        self.now
            .get_or_insert_with(|| format_timestamp(OffsetDateTime::now_utc()))
            .clone()
    }
    fn next_id(&mut self) -> String {
        self.ids.next_string()
    }
    fn end_request(&mut self) {
        self.now = None;
    }
}

pub fn format_timestamp(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_string())
}

/// The fields of one event as found in the body, borrowed where possible.
#[derive(Default)]
struct Fields<'a> {
    event_type: Option<Cow<'a, str>>,
    data: Option<&'a [u8]>,
    timestamp: Option<Cow<'a, str>>,
    id: Option<Cow<'a, str>>,
    stream: Option<Cow<'a, str>>,
    expected_version: Option<u64>,
    metadata: Option<&'a [u8]>,
}

impl<'a> Fields<'a> {
    fn validate(self, stamp: &mut Stamp) -> Result<NewEvent, EventError> {
        let event_type = match self.event_type {
            None => return Err(bad("missing_type", "event 'type' is required")),
            Some(t) if t.trim().is_empty() => {
                return Err(bad("empty_type", "event 'type' must not be empty"))
            }
            Some(t) if t.len() > EVENT_TYPE_BYTES_MAX => {
                return Err(bad(
                    "type_too_long",
                    format!("event 'type' is longer than {EVENT_TYPE_BYTES_MAX} bytes"),
                ))
            }
            Some(t) => t.into_owned(),
        };
        let timestamp = match self.timestamp {
            None => stamp.now(),
            Some(ts) => {
                let parsed = OffsetDateTime::parse(&ts, &Rfc3339).map_err(|_| {
                    bad("invalid_timestamp", format!("'timestamp' {ts:?} is not an RFC 3339 date-time such as 2024-01-01T12:00:00Z"))
                })?;
                // Go's zero time is what ebuse's client sends when the caller set none.
                if parsed.unix_timestamp() == GO_ZERO_UNIX && parsed.nanosecond() == 0 {
                    stamp.now()
                } else {
                    format_timestamp(parsed.to_offset(time::UtcOffset::UTC))
                }
            }
        };
        let id = match self.id {
            None => stamp.next_id(),
            Some(id) if id.is_empty() => stamp.next_id(),
            Some(id) if id.len() > EVENT_ID_BYTES_MAX => {
                return Err(bad(
                    "id_too_long",
                    format!("event 'id' is longer than {EVENT_ID_BYTES_MAX} bytes"),
                ))
            }
            Some(id) => id.into_owned(),
        };
        let stream = match self.stream {
            None => None,
            Some(s) if s.is_empty() => None,
            Some(s) if s.len() > STREAM_NAME_BYTES_MAX => {
                return Err(bad(
                    "stream_too_long",
                    format!("'stream' is longer than {STREAM_NAME_BYTES_MAX} bytes"),
                ))
            }
            Some(s) => Some(s.into_owned()),
        };
        if self.expected_version.is_some() && stream.is_none() {
            return Err(bad(
                "expected_version_without_stream",
                "'expected_version' needs a 'stream'",
            ));
        }
        Ok(NewEvent {
            id,
            event_type,
            data: self.data.unwrap_or(b"null").to_vec(),
            timestamp,
            stream,
            expected_version: self.expected_version,
            metadata: self.metadata.map(|m| m.to_vec()),
        })
    }
}

/// `0001-01-01T00:00:00Z` in Unix seconds.
const GO_ZERO_UNIX: i64 = -62_135_596_800;

// ---------------------------------------------------------------------------
// serde_json path

#[derive(Deserialize)]
struct SerdeEvent<'a> {
    #[serde(rename = "type", borrow, default)]
    event_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    timestamp: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    stream: Option<Cow<'a, str>>,
    #[serde(default)]
    expected_version: Option<u64>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

impl<'a> From<SerdeEvent<'a>> for Fields<'a> {
    fn from(e: SerdeEvent<'a>) -> Fields<'a> {
        Fields {
            event_type: e.event_type,
            data: e.data.map(|r| r.get().as_bytes()),
            timestamp: e.timestamp,
            id: e.id,
            stream: e.stream,
            expected_version: e.expected_version,
            metadata: e.metadata.map(|r| r.get().as_bytes()),
        }
    }
}

/// An event that must be a JSON object: derived `Deserialize` would also take
/// a positional array (`["order.placed", {...}]`) as a struct; forcing
/// `deserialize_map` refuses it.
struct EventObject<'a>(SerdeEvent<'a>);

impl<'de> Deserialize<'de> for EventObject<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = EventObject<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                SerdeEvent::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(EventObject)
            }
        }
        d.deserialize_map(V)
    }
}

/// The body as text: JSON is UTF-8 throughout, also in members the server
/// ignores (serde_json skips those without checking UTF-8; found by fuzzing).
fn utf8(body: &[u8]) -> Result<&str, EventError> {
    std::str::from_utf8(body).map_err(|e| json_error(format!("not UTF-8: {e}")))
}

fn serde_object(body: &[u8]) -> Result<SerdeEvent<'_>, EventError> {
    let text = utf8(body)?;
    match body.iter().find(|c| !c.is_ascii_whitespace()) {
        Some(b'{') => serde_json::from_str::<EventObject>(text)
            .map(|e| e.0)
            .map_err(json_error),
        Some(_) => Err(json_error("each event must be a JSON object")),
        None => Err(json_error("empty body")),
    }
}

fn json_error(e: impl std::fmt::Display) -> EventError {
    bad(
        "invalid_json",
        format!("request body is not valid JSON for an event: {e}"),
    )
}

// ---------------------------------------------------------------------------
// Entry points

/// Parse and validate the body of `POST /events`.
pub fn parse_one(body: &[u8], stamp: &mut Stamp) -> Result<NewEvent, EventError> {
    let r = serde_object(body).and_then(|e| Fields::from(e).validate(stamp));
    stamp.end_request();
    r
}

/// Parse and validate the body of `POST /events/batch`: all events or an error
/// naming the first bad one.
pub fn parse_batch(
    body: &[u8],
    max: usize,
    stamp: &mut Stamp,
) -> Result<Vec<NewEvent>, EventError> {
    let r = parse_batch_inner(body, max, stamp);
    stamp.end_request();
    r
}

fn parse_batch_inner(
    body: &[u8],
    max: usize,
    stamp: &mut Stamp,
) -> Result<Vec<NewEvent>, EventError> {
    let too_many = |n: usize| {
        bad(
            "batch_too_large",
            format!("batch has {n} events; at most {max} are allowed"),
        )
    };
    let at = |i: usize, e: EventError| EventError {
        code: e.code,
        message: format!("event {i}: {}", e.message),
    };
    let raw: Vec<EventObject> = serde_json::from_str(utf8(body)?).map_err(|e| {
        bad(
            "invalid_json",
            format!("request body is not a valid JSON array of events: {e}"),
        )
    })?;
    check_count(raw.len(), max).map_err(|e| {
        if e.code == "batch_too_large" {
            too_many(raw.len())
        } else {
            e
        }
    })?;
    raw.into_iter()
        .enumerate()
        .map(|(i, e)| Fields::from(e.0).validate(stamp).map_err(|err| at(i, err)))
        .collect()
}

fn check_count(n: usize, max: usize) -> Result<(), EventError> {
    if n == 0 {
        return Err(bad("empty_batch", "batch must hold at least one event"));
    }
    if n > max {
        return Err(bad("batch_too_large", ""));
    }
    Ok(())
}

/// Append `s` as a JSON string.
pub fn push_json_str(out: &mut Vec<u8>, s: &str) {
    push_json_bytes(out, s.as_bytes())
}

/// Append UTF-8 text as a JSON string, escaped exactly as serde_json does
/// (`\"`, `\\`, the five short control escapes, `\u00XX` for the other
/// control bytes; everything else verbatim). Takes bytes so that text read
/// from SQLite, which was validated as UTF-8 when it was written, is not
/// validated again on every read: on a 10,000-event page that validation and
/// serde's per-char path were ~10% of the reader's time.
pub fn push_json_bytes(out: &mut Vec<u8>, s: &[u8]) {
    out.reserve(s.len() + 2);
    out.push(b'"');
    // Ids, types and stream names almost never need escaping: one
    // branch-free (vectorisable) pass answers that before the byte loop.
    let plain = s
        .iter()
        .fold(true, |ok, &b| ok & (b >= 0x20) & (b != b'"') & (b != b'\\'));
    if plain {
        out.extend_from_slice(s);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &b) in s.iter().enumerate() {
        let short: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if short.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[(b >> 4) as usize]);
            out.push(HEX[(b & 0xf) as usize]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

/// Append the stored event as the JSON object ebuse's client decodes, plus
/// shardcast's additive fields.
pub fn encode_event(out: &mut Vec<u8>, e: &Event, duplicate: bool) {
    encode_fields(
        out,
        &EventRef {
            position: e.position,
            event_type: e.new.event_type.as_bytes(),
            data: &e.new.data,
            timestamp: e.new.timestamp.as_bytes(),
            id: e.new.id.as_bytes(),
            stream: e.new.stream.as_deref().map(str::as_bytes),
            stream_version: e.stream_version,
            metadata: e.new.metadata.as_deref(),
        },
        duplicate,
    )
}

/// A stored event's fields, borrowed (from an `Event`, or straight from a
/// SQLite row, so reads encode without building owned events first).
pub struct EventRef<'a> {
    pub position: u64,
    pub event_type: &'a [u8],
    pub data: &'a [u8],
    pub timestamp: &'a [u8],
    pub id: &'a [u8],
    pub stream: Option<&'a [u8]>,
    pub stream_version: Option<u64>,
    pub metadata: Option<&'a [u8]>,
}

/// Encode a stored event as JSON, the shape every endpoint answers with.
pub fn encode_fields(out: &mut Vec<u8>, e: &EventRef<'_>, duplicate: bool) {
    let mut buf = itoa::Buffer::new();
    out.extend_from_slice(b"{\"position\":");
    out.extend_from_slice(buf.format(e.position).as_bytes());
    out.extend_from_slice(b",\"type\":");
    push_json_bytes(out, e.event_type);
    out.extend_from_slice(b",\"data\":");
    out.extend_from_slice(e.data);
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(e.timestamp);
    out.extend_from_slice(b"\",\"id\":");
    push_json_bytes(out, e.id);
    if let Some(stream) = e.stream {
        out.extend_from_slice(b",\"stream\":");
        push_json_bytes(out, stream);
        out.extend_from_slice(b",\"stream_version\":");
        out.extend_from_slice(buf.format(e.stream_version.unwrap_or(0)).as_bytes());
    }
    if let Some(m) = e.metadata {
        out.extend_from_slice(b",\"metadata\":");
        out.extend_from_slice(m);
    }
    if duplicate {
        out.extend_from_slice(b",\"duplicate\":true");
    }
    out.push(b'}');
}

/// Events as a JSON array, as `POST /events` shapes each one.
pub fn events_json(events: &[Event]) -> Vec<u8> {
    let mut body =
        Vec::with_capacity(2 + events.iter().map(|e| 160 + e.new.data.len()).sum::<usize>());
    body.push(b'[');
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        encode_event(&mut body, e, false);
    }
    body.push(b']');
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp::new(crate::ids::IdGen::new())
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_does() {
        let mut samples: Vec<String> = (0u32..0x80)
            .map(|c| format!("a{}b", char::from_u32(c).unwrap()))
            .collect();
        samples.extend(
            [
                "",
                "plain-id-123",
                "\"q\" \\ \u{7f} é 漢 🎉",
                "\n\r\t\u{8}\u{c}\u{0}\u{1f}end",
            ]
            .map(String::from),
        );
        for s in samples {
            let mut ours = Vec::new();
            push_json_str(&mut ours, &s);
            assert_eq!(
                String::from_utf8(ours).unwrap(),
                serde_json::to_string(&s).unwrap(),
                "{s:?}"
            );
        }
    }

    #[test]
    fn data_is_kept_byte_for_byte() {
        let body = br#"{"type":"order.placed","data":{ "b" : [1, 2.50, "x\"y"], "a":1e3 },"id":"e-1","timestamp":"2024-01-02T03:04:05.123+02:00","metadata":{"k":"v"}}"#;
        let e = parse_one(body, &mut stamp()).unwrap();
        assert_eq!(e.data, br#"{ "b" : [1, 2.50, "x\"y"], "a":1e3 }"#.to_vec());
        assert_eq!(e.event_type, "order.placed");
        assert_eq!(e.id, "e-1");
        assert_eq!(e.timestamp, "2024-01-02T01:04:05.123Z");
        assert_eq!(e.metadata.as_deref(), Some(&br#"{"k":"v"}"#[..]));
    }

    #[test]
    fn ebuse_client_body_is_accepted() {
        // What Go's json.Marshal makes of ebuse's StoredEvent with only Type and Data set.
        let body = br#"{"position":0,"type":"user.created","data":{"name":"x"},"timestamp":"0001-01-01T00:00:00Z"}"#;
        let mut e = parse_one(body, &mut stamp()).unwrap();
        e.timestamp.truncate(2);
        assert_eq!(e.data, br#"{"name":"x"}"#.to_vec());
        assert_eq!(e.timestamp, "20"); // replaced by now, not year 1
    }

    #[test]
    fn only_the_exact_zero_time_is_replaced() {
        let body = br#"{"type":"a","timestamp":"0001-01-01T00:00:00.000000001Z"}"#;
        let e = parse_one(body, &mut stamp()).unwrap();
        assert_eq!(e.timestamp, "0001-01-01T00:00:00.000000001Z");
        let body = br#"{"type":"a","timestamp":"0001-01-01T00:00:01Z"}"#;
        assert_eq!(
            parse_one(body, &mut stamp()).unwrap().timestamp,
            "0001-01-01T00:00:01Z"
        );
    }

    #[test]
    fn escaped_strings_are_decoded() {
        let body = br#"{"type":"a\u00e9\n","stream":"s\/1","data":null}"#;
        let e = parse_one(body, &mut stamp()).unwrap().event_type;
        assert_eq!(e, "a\u{e9}\n");
    }

    #[test]
    fn errors_have_codes() {
        let code = |b: &[u8]| parse_one(b, &mut stamp()).unwrap_err().code;
        assert_eq!(code(b"{"), "invalid_json");
        assert_eq!(code(br#"{"data":1}"#), "missing_type");
        assert_eq!(code(br#"{"type":"  "}"#), "empty_type");
        assert_eq!(
            code(br#"{"type":"a","timestamp":"yesterday"}"#),
            "invalid_timestamp"
        );
        assert_eq!(
            code(br#"{"type":"a","expected_version":-1,"stream":"s"}"#),
            "invalid_json"
        );
        assert_eq!(
            code(br#"{"type":"a","expected_version":1}"#),
            "expected_version_without_stream"
        );
        assert_eq!(code(br#"{"type":1}"#), "invalid_json");
        assert_eq!(code(br#"[]"#), "invalid_json");
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(EVENT_TYPE_BYTES_MAX + 1));
        assert_eq!(code(long.as_bytes()), "type_too_long");
    }

    #[test]
    fn batches_parse_and_count() {
        let body = br#"[{"type":"a","data":1},{"type":"b","data":[1,{"c":"]"}]}]"#;
        let v: Vec<_> = parse_batch(body, 1000, &mut stamp())
            .unwrap()
            .into_iter()
            .map(|e| e.data)
            .collect();
        assert_eq!(v, vec![b"1".to_vec(), br#"[1,{"c":"]"}]"#.to_vec()]);
        let code = |b: &[u8], max| parse_batch(b, max, &mut stamp()).unwrap_err().code;
        assert_eq!(code(b"[]", 10), "empty_batch");
        assert_eq!(
            code(br#"[{"type":"a"},{"type":"b"},{"type":"c"}]"#, 2),
            "batch_too_large"
        );
        assert_eq!(code(br#"[{"type":"a"},{"data":1}]"#, 10), "missing_type");
        assert_eq!(code(br#"{"type":"a"}"#, 10), "invalid_json");
        // A positional array is not an event, in a batch as alone.
        assert_eq!(code(br#"[["a",null]]"#, 10), "invalid_json");
        assert_eq!(
            parse_one(br#"["a",null]"#, &mut stamp()).unwrap_err().code,
            "invalid_json"
        );
    }

    #[test]
    fn events_in_one_request_share_a_timestamp_and_get_distinct_ids() {
        let body = br#"[{"type":"a"},{"type":"b"}]"#;
        let v = parse_batch(body, 10, &mut stamp()).unwrap();
        assert_eq!(v[0].timestamp, v[1].timestamp);
        assert_ne!(v[0].id, v[1].id);
        assert_eq!(v[0].id.len(), 36);
    }

    #[test]
    fn encoding_round_trips_through_serde() {
        let e = Event {
            position: 7,
            stream_version: Some(3),
            new: parse_one(
                br#"{"type":"t\"q","data":{"x":1},"stream":"s","id":"i"}"#,
                &mut stamp(),
            )
            .unwrap(),
        };
        let mut out = Vec::new();
        encode_event(&mut out, &e, true);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["position"], 7);
        assert_eq!(v["type"], "t\"q");
        assert_eq!(v["data"]["x"], 1);
        assert_eq!(v["stream_version"], 3);
        assert_eq!(v["duplicate"], true);
    }
}
