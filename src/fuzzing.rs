//! Oracles for the fuzz targets (`fuzz/`), shared with the corpus replay
//! test (`tests/it/fuzz_corpus.rs`) so a saved input is checked the same way on
//! the stable toolchain in every `cargo test`.
//!
//! Each function takes arbitrary bytes, runs one parser of untrusted input
//! the way the server does, and panics when a property beyond "does not
//! crash" breaks: a head parsed from a stream is the head parsed from its
//! own bytes, the two event parsers agree, an accepted event encodes and
//! parses back to itself, an accepted tenants file has names and keys that
//! cannot collide, and a live server answers a byte stream split at any
//! points as it answers it whole.

use crate::config::{Config, Env};
use crate::http::{parse_head, Parsed};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// The head limit the fuzzed parser runs with (the default `server.max_header_bytes`).
const FUZZ_HEADER_BYTES_MAX: usize = 16 * 1024;

/// `http::parse_head`: a complete head depends on its own bytes only, lies
/// within them, and no shorter prefix of it is complete.
pub fn http_head(data: &[u8]) {
    match parse_head(data, FUZZ_HEADER_BYTES_MAX) {
        Parsed::Complete(h) => {
            assert!(h.head_len <= data.len() && h.head_len <= FUZZ_HEADER_BYTES_MAX);
            for r in [&h.path, &h.query]
                .into_iter()
                .chain(h.api_key.iter())
                .chain(h.origin.iter())
                .chain(h.last_event_id.iter())
            {
                assert!(
                    r.start <= r.end && r.end <= h.head_len,
                    "{r:?} outside the head"
                );
            }
            let own = &data[..h.head_len];
            match parse_head(own, FUZZ_HEADER_BYTES_MAX) {
                Parsed::Complete(again) => {
                    assert_eq!(
                        format!("{h:?}"),
                        format!("{again:?}"),
                        "the bytes after a head changed it"
                    )
                }
                _ => panic!("a head is not complete on its own bytes"),
            }
            if h.head_len > 0 {
                assert!(
                    !matches!(
                        parse_head(&own[..h.head_len - 1], FUZZ_HEADER_BYTES_MAX),
                        Parsed::Complete(_)
                    ),
                    "a head complete one byte early"
                );
            }
            if let Some(n) = h.content_length {
                // Every Content-Length line says n, in digits only.
                let mut headers = [httparse::EMPTY_HEADER; crate::limits::REQUEST_HEADERS_MAX];
                let mut req = httparse::Request::new(&mut headers);
                assert!(req.parse(own).is_ok_and(|s| s.is_complete()));
                let values: Vec<&[u8]> = req
                    .headers
                    .iter()
                    .filter(|x| x.name.eq_ignore_ascii_case("content-length"))
                    .map(|x| x.value.trim_ascii())
                    .collect();
                assert!(!values.is_empty());
                for v in values {
                    assert!(v.iter().all(u8::is_ascii_digit), "{v:?}");
                    assert!(v == b"0" || v[0] != b'0', "{v:?}");
                    assert_eq!(
                        std::str::from_utf8(v).ok().and_then(|t| t.parse().ok()),
                        Some(n)
                    );
                }
            }
            assert!(!(h.chunked && h.content_length.is_some()));
        }
        Parsed::Partial => assert!(data.len() <= FUZZ_HEADER_BYTES_MAX),
        Parsed::Invalid(e) => {
            // 501: a transfer coding other than chunked.
            assert!(matches!(e.status, 400 | 431 | 501), "{}", e.status);
            assert!(e.close, "a framing error must end the connection");
        }
    }
}

/// `event::parse_one` and `parse_batch`: what is accepted is JSON (UTF-8,
/// grammar) by a second reader, serde_json's `RawValue`; an accepted event
/// encodes (`encode_event`) and parses back to itself, `data` byte for
/// byte; a batch holds the events each element makes alone.
pub fn events(data: &[u8]) {
    use crate::event::{encode_event, parse_batch, parse_one, Event, Stamp};
    // Raw values: `data` may hold escapes serde_json's Value refuses (a lone
    // surrogate), which the server keeps and returns as given.
    type Object = std::collections::BTreeMap<String, Box<serde_json::value::RawValue>>;
    let stamp = || Stamp::new(crate::ids::IdGen::new());
    let json = || {
        std::str::from_utf8(data)
            .ok()
            .and_then(|t| serde_json::from_str::<&serde_json::value::RawValue>(t).ok())
            .is_some()
    };
    if let Ok(new) = parse_one(data, &mut stamp()) {
        assert!(json(), "accepted an event that is not JSON");
        let e = Event {
            position: 1,
            stream_version: new.stream.as_ref().map(|_| 1),
            new,
        };
        let mut encoded = Vec::new();
        encode_event(&mut encoded, &e, false);
        let back = parse_one(&encoded, &mut stamp())
            .unwrap_or_else(|err| panic!("an accepted event does not parse back: {err:?}"));
        let mut want = e.new.clone();
        want.expected_version = None; // not part of a stored event
        assert_eq!(back, want, "encode → parse is not identity");
        let v: Object = serde_json::from_slice(&encoded).unwrap_or_else(|e| {
            panic!(
                "not a JSON object ({e}): {}",
                String::from_utf8_lossy(&encoded)
            )
        });
        assert_eq!(v.get("position").map(|p| p.get()), Some("1"));
    }
    if let Ok(batch) = parse_batch(data, 1000, &mut stamp()) {
        assert!(json(), "accepted a batch that is not JSON");
        let elements: Vec<Box<serde_json::value::RawValue>> =
            serde_json::from_slice(data).expect("a batch is an array");
        assert_eq!(elements.len(), batch.len());
        for (raw, e) in elements.iter().zip(&batch) {
            let alone = parse_one(raw.get().as_bytes(), &mut stamp()).expect("each element alone");
            assert_eq!(
                (&alone.event_type, &alone.data, &alone.stream),
                (&e.event_type, &e.data, &e.stream)
            );
        }
    }
}

/// The chunked-body decoder (`http::chunked`), fed bytes whole and split at
/// `cuts` as reads would split them: it never panics, both ways agree (the
/// same body and the same rest, or the same refusal), the decoded body
/// stays within its limit, and the buffer never holds more than the body
/// decoded so far plus the read just taken.
pub fn chunked_body(stream: &[u8], cuts: &[usize]) {
    use crate::http::chunked::Dechunk;
    const MAX: usize = 512;
    let run = |cuts: &[usize]| -> Result<(Vec<u8>, Vec<u8>), u16> {
        let mut d = Dechunk::new(MAX);
        let mut buf = Vec::new();
        let mut at = 0;
        for end in cuts.iter().copied().chain([stream.len()]) {
            let piece = &stream[at..end.max(at)];
            at = end.max(at);
            buf.extend_from_slice(piece);
            let (shrank, done) = d.advance(&mut buf).map_err(|e| e.status)?;
            assert!(shrank <= buf.len());
            buf.truncate(buf.len() - shrank);
            assert!(d.decoded() <= MAX, "decoded past the limit");
            assert!(
                buf.len() <= d.decoded() + piece.len() + 1,
                "the buffer kept raw bytes"
            );
            if done {
                let mut rest = buf.split_off(d.decoded());
                rest.extend_from_slice(&stream[at..]);
                return Ok((buf, rest));
            }
        }
        Err(0)
    };
    let whole = run(&[]);
    let split = run(cuts);
    // An incomplete body may be refused later in one split than in the
    // other only if one of them is still waiting for bytes (Err(0)).
    if whole != Err(0) && split != Err(0) {
        assert_eq!(whole, split, "split at {cuts:?}");
    }
    if let Ok((body, _)) = &whole {
        assert!(body.len() <= MAX);
    }
}

/// Query strings: SSE subscription parameters and the read endpoints'
/// `Query`, and the path parameters (`/streams/{s}`, `/subscriptions/{id}`).
pub fn query(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (q, rest) = text.split_once('\n').unwrap_or((text, ""));
    let (last_id, key) = rest.split_once('\n').unwrap_or((rest, ""));
    let last = (!last_id.is_empty()).then_some(last_id);
    let k = (!key.is_empty()).then_some(key.as_bytes());
    if let Ok(s) = crate::shard::fanout::subscription(q, last, k.map(Into::into), None) {
        // Every pattern is a name or a prefix; a '*' only ends one.
        for t in s.filter.types.iter().chain(s.filter.streams.iter()) {
            let (crate::shard::fanout::Pattern::Exact(n)
            | crate::shard::fanout::Pattern::Prefix(n)) = t;
            assert!(!n.contains('*'), "{t:?}");
        }
        assert_eq!(s.key.as_deref(), k);
    }
    let query = crate::http::query::Query(q);
    for name in [
        "from",
        "to",
        "limit",
        "type",
        "from_version",
        "mode",
        "batch_size",
    ] {
        if let Ok(n) = query.count(name, 5, 10_000) {
            assert!((1..=10_000).contains(&n));
        }
        let _ = query.number(name, 0);
    }
    // Decoding never grows a value, and text without escapes is itself.
    let d = crate::http::query::decode_query_value(q);
    assert!(d.len() <= q.len());
    if !q.contains(['%', '+']) {
        assert_eq!(d, q);
    }
    for path in [
        format!("/streams/{q}"),
        format!("/subscriptions/{q}/position"),
    ] {
        if let Some(s) = crate::api::stream_name(&path) {
            assert!(!s.is_empty() && s.len() <= crate::limits::STREAM_NAME_BYTES_MAX);
        }
        let _ = crate::api::consumer_id(&path);
    }
}

/// A scratch file for the config parsers, one per thread.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shardcast-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir.join(format!("{name}-{:?}", std::thread::current().id()))
}

/// The TOML config file: loads or is refused with a key and a message; a
/// loaded config loads the same again, and its tenants (`[[tenants]]`) make
/// a tenancy whose names and keys cannot collide.
pub fn config_toml(data: &[u8]) {
    let f = scratch("config.toml");
    std::fs::write(&f, data).expect("write scratch");
    let env = HashMap::<String, String>::new();
    match Config::load(Some(&f), &env) {
        Ok(cfg) => {
            let again = Config::load(Some(&f), &env).expect("loads once, loads twice");
            assert_eq!(format!("{cfg:?}"), format!("{again:?}"));
            check_tenancy(&cfg);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// ebuse's tenants.yaml: refused with a message, or a tenancy whose names
/// and keys cannot collide.
pub fn tenants_yaml(data: &[u8]) {
    let f = scratch("tenants.yaml");
    std::fs::write(&f, data).expect("write scratch");
    let mut env = HashMap::<String, String>::new();
    env.insert(
        "SHARDCAST_AUTH_TENANTS_FILE".into(),
        f.display().to_string(),
    );
    if let Ok(cfg) = Config::load(None, &env) {
        check_tenancy(&cfg);
    }
}

fn check_tenancy(cfg: &Config) {
    let Ok(t) = crate::tenant::Tenancy::from_config(cfg) else {
        return;
    };
    let mut names: Vec<String> = t
        .tenants
        .iter()
        .map(|s| s.name.to_ascii_lowercase())
        .collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(names.len(), n, "two tenants share a name ignoring case");
    let mut keys: Vec<_> = t
        .tenants
        .iter()
        .flat_map(|s| s.keys.iter().map(|k| k.0))
        .collect();
    keys.sort();
    let k = keys.len();
    keys.dedup();
    assert_eq!(keys.len(), k, "two tenants share a key");
    for s in t.tenants.iter().filter(|_| t.multi) {
        let file = s
            .database
            .path
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("");
        assert_eq!(
            file,
            format!("{}.db", s.name),
            "a name that escapes its directory"
        );
    }
}

/// A server of this process's own, started once, on loopback.
fn local_server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        // As the `shardcast` binary runs (Rust's runtime sets this before
        // `main`; libFuzzer's `main` does not): a write to a peer that has
        // gone must be an error, not SIGPIPE ending the process.
        // SAFETY: setting a signal's disposition to ignore.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("shardcast-fuzz-server-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("data dir");
        let env: HashMap<String, String> = [
            ("PORT", port.to_string()),
            ("DB_PATH", dir.join("events.db").display().to_string()),
            ("RATE_LIMIT", "0".into()),
            ("SHARDCAST_SERVER_PIN_CPUS", "false".into()),
            ("SHARDCAST_SERVER_SHARDS", "1".into()),
            ("SHARDCAST_SERVER_CORS_ORIGINS", "https://a.example".into()),
            ("SHARDCAST_SERVER_READ_TIMEOUT", "2s".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let cfg = Config::load(None, &env as &dyn Env).expect("fuzz server config");
        std::thread::spawn(move || {
            let reload: crate::server::LoadConfig =
                Box::new(|| Err("no reloads while fuzzing".into()));
            crate::server::run(cfg, reload).expect("fuzz server runs");
        });
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        for _ in 0..500 {
            if TcpStream::connect(addr).is_ok() {
                return addr;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the fuzz server did not start");
    })
}

/// How one connection went: the status of every answer, and whether it
/// ended with the server's orderly close (rather than a reset).
#[derive(Debug, PartialEq)]
struct Exchange {
    statuses: Vec<u16>,
    clean: bool,
}

/// Send `stream` in the pieces `cuts` makes of it (a pause after each, so
/// the server reads them apart), close our side, and read every answer
/// until the server closes. Panics on bytes that are not HTTP/1.1 answers.
fn exchange(addr: SocketAddr, stream: &[u8], cuts: &[usize]) -> Exchange {
    let mut c = TcpStream::connect(addr).expect("connect to the fuzz server");
    c.set_nodelay(true).ok();
    c.set_read_timeout(Some(Duration::from_secs(20))).ok();
    let mut at = 0;
    let mut sent_all = true;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        let cut = cut.clamp(at, stream.len());
        if c.write_all(&stream[at..cut]).is_err() {
            sent_all = false;
            break;
        }
        at = cut;
        if at < stream.len() {
            std::thread::sleep(Duration::from_micros(300));
        }
    }
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut got = Vec::new();
    let clean = loop {
        let mut buf = [0u8; 16384];
        match c.read(&mut buf) {
            Ok(0) => break sent_all,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                panic!("the server neither answered nor closed within 20 s of our close")
            }
            Err(_) => break false,
        }
    };
    let may_head = stream.windows(4).any(|w| w.eq_ignore_ascii_case(b"HEAD"));
    Exchange {
        statuses: answers(&got, clean, may_head),
        clean,
    }
}

/// The statuses of a byte stream of HTTP/1.1 answers; panics when it is
/// not one (a complete stream must end exactly after its last answer).
/// `may_head`: some requests were HEAD (answers without their body).
fn answers(mut b: &[u8], complete: bool, may_head: bool) -> Vec<u16> {
    let mut statuses = Vec::new();
    while !b.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut r = httparse::Response::new(&mut headers);
        let n = match r.parse(b) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if !complete => break,
            other => panic!(
                "not an HTTP answer ({other:?}): {:?}",
                String::from_utf8_lossy(&b[..b.len().min(300)])
            ),
        };
        let status = r.code.expect("status");
        let header = |name: &str| {
            r.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
        };
        if status == 100 {
            b = &b[n..];
            continue;
        }
        statuses.push(status);
        if header("content-type").as_deref() == Some("text/event-stream") {
            break; // an SSE stream runs to the close
        }
        if header("transfer-encoding").is_some() {
            match dechunk(&b[n..]) {
                Some(len) => b = &b[n + len..],
                None if !complete => break,
                None => panic!("a chunked answer does not end"),
            }
            continue;
        }
        let len: usize = match header("content-length") {
            Some(v) => v.parse().expect("Content-Length is a number"),
            None => {
                assert!(
                    status == 204 || status == 304,
                    "{status} without Content-Length"
                );
                0
            }
        };
        // An answer to HEAD has the length but not the body: the next
        // answer (or the close) follows the head at once.
        let rest = &b[n..];
        if may_head && (rest.is_empty() || rest.starts_with(b"HTTP/1.1 ")) && len > 0 {
            b = rest;
            continue;
        }
        if b.len() < n + len {
            assert!(!complete, "an answer shorter than its Content-Length");
            break;
        }
        b = &b[n + len..];
    }
    statuses
}

/// The length of a whole chunked body at the start of `b`, if it is there.
fn dechunk(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        let eol = b[i..].windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[i..i + eol]).ok()?.trim(), 16).ok()?;
        i += eol + 2 + size + 2;
        if i > b.len() {
            return None;
        }
        if size == 0 {
            return Some(i);
        }
    }
}

/// A live server, in this process, fed `stream` whole and then split at
/// `cuts`: it stays up, every byte it sends is a well-formed answer, and a
/// stream that changes nothing (no POST or PUT) gets the same statuses both
/// ways when both connections ended cleanly.
pub fn server_stream(stream: &[u8], cuts: &[usize]) {
    let addr = local_server();
    let whole = exchange(addr, stream, &[]);
    let split = exchange(addr, stream, cuts);
    let mutates = [&b"POST"[..], b"PUT"]
        .iter()
        .any(|m| stream.windows(m.len()).any(|w| w.eq_ignore_ascii_case(m)));
    if whole.clean && split.clean && !mutates {
        assert_eq!(whole.statuses, split.statuses, "split at {cuts:?}");
    }
    // Still serving.
    let probe = exchange(
        addr,
        b"GET /health HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n",
        &[],
    );
    assert_eq!(probe.statuses, vec![200], "the server stopped serving");
}

/// Most cuts one server input makes.
const FUZZ_CUTS_MAX: usize = 8;

/// A server input's parts: byte 0 says how many cuts (mod 9), then two
/// bytes (little-endian) per cut, then the byte stream itself. Cuts are
/// sorted offsets into the stream.
pub fn split_input(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), data);
    };
    let n = (n as usize % (FUZZ_CUTS_MAX + 1)).min(rest.len() / 2);
    let (offsets, stream) = rest.split_at(n * 2);
    let mut cuts: Vec<usize> = offsets
        .chunks(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]) as usize % (stream.len() + 1))
        .collect();
    cuts.sort_unstable();
    (cuts, stream)
}

/// `token::TokenKeys::verify`: bytes as a presented token, and the same
/// bytes as the claims of a properly signed HS256 token (so the claim
/// checks are reached, not only the signature check). Never a panic; an
/// accepted token grants a user, a future expiry and a non-empty scope,
/// and verifies the same way twice.
pub fn token(data: &[u8]) {
    use crate::token::{TokenKeys, SUB_BYTES_MAX};
    const SECRET: &str = "fuzzing-secret-0123456789abcdef!";
    const NOW: u64 = 1_800_000_000;
    static KEYS: OnceLock<TokenKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        TokenKeys::from_config("fuzz", Some(SECRET), None, None)
            .expect("a secret makes keys")
            .expect("a secret is configured")
    });
    let check = |token: &str| {
        if let Ok(g) = keys.verify(token, NOW) {
            assert!(!g.sub.is_empty() && g.sub.len() <= SUB_BYTES_MAX);
            assert!(g.expires > NOW);
            assert!(!g.scope.types.is_empty() || !g.scope.streams.is_empty());
            assert_eq!(keys.verify(token, NOW), Ok(g));
        }
        let _ = crate::token::tenant_claim(token);
        let _ = crate::token::looks_like_jwt(token.as_bytes());
    };
    check(&String::from_utf8_lossy(data));
    if let Ok(claims) = serde_json::from_slice::<serde_json::Value>(data) {
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).expect("an HMAC key");
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        if let Ok(t) = jsonwebtoken::encode(&header, &claims, &key) {
            check(&t);
        }
    }
}

/// `writer::codec::decode`: bytes as a JetStream message of the log (a
/// damaged or foreign message on the stream). Never a panic; what decodes
/// encodes back to exactly the same bytes (so every node, decoding the
/// same message, applies the same requests).
pub fn log_message(data: &[u8]) {
    use crate::writer::codec;
    if let Ok(requests) = codec::decode(data, 1) {
        let mut again = Vec::new();
        codec::encode(requests.iter(), &mut again);
        assert_eq!(again, data, "a decoded message encodes back to its bytes");
        let predicted: usize =
            codec::HEADER_BYTES + requests.iter().map(codec::encoded_len).sum::<usize>();
        assert_eq!(predicted, data.len());
    }
}
