//! HTTP/1.1 framing as a property: any sequence of valid requests, sent on
//! one connection whole or split at any byte boundaries (each piece its own
//! write, read apart by the server), gets byte-identical answers.
//!
//! One server serves every case. Each case's stream is sent once first so
//! that every append in it is a duplicate afterwards (ids are fixed): the
//! two runs that are compared then change nothing, and every answer
//! (positions, timestamps, `duplicate`) is the same both ways.

use crate::common::*;
use proptest::prelude::*;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;

const ORIGIN: &str = "https://app.example";

/// One request of the kinds the framing must keep apart: with and without
/// bodies, answered by handlers and refused from the head (whose bodies are
/// then read and dropped), with `Expect: 100-continue`, HEAD.
fn request(kind: u8, k: u8) -> Vec<u8> {
    let json = [("Content-Type", "application/json")];
    match kind % 12 {
        0 => build_request("GET", "/health", &[], b""),
        1 => build_request("GET", "/position", &[], b""),
        2 => build_request(
            "GET",
            &format!("/events?from={}&limit=3", k % 5 + 1),
            &[],
            b"",
        ),
        3 => build_request("HEAD", "/events?from=1&limit=2", &[], b""),
        4 => build_request(
            "POST",
            "/events",
            &json,
            format!(
                r#"{{"type":"t{}","id":"fx-{k}","stream":"s{}","data":{{"k":{k}}}}}"#,
                k % 3,
                k % 2
            )
            .as_bytes(),
        ),
        5 => build_request(
            "POST",
            "/events/batch",
            &json,
            format!(
                r#"[{{"type":"b","id":"fb-{k}-0"}},{{"type":"b","id":"fb-{k}-1","data":[1,2]}}]"#
            )
            .as_bytes(),
        ),
        6 => build_request(
            "PUT",
            "/subscriptions/c1/position",
            &json,
            b"{\"position\":1}",
        ),
        7 => build_request("GET", &format!("/streams/s{}", k % 2), &[], b""),
        8 => build_request("OPTIONS", "/events", &[("Origin", ORIGIN)], b""),
        // Refused from the head, with a body to skip.
        9 => build_request("DELETE", "/position", &[("Content-Length", "5")], b"")
            .into_iter()
            .chain(*b"abcde")
            .collect(),
        // A chunked body, in chunks of three bytes with a trailer.
        10 => {
            let body = format!(r#"{{"type":"c","id":"fc-{k}","data":[{k}]}}"#);
            let mut raw =
                b"POST /events HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for piece in body.as_bytes().chunks(3) {
                raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
                raw.extend_from_slice(piece);
                raw.extend_from_slice(b"\r\n");
            }
            raw.extend_from_slice(b"0\r\nX-T: 1\r\n\r\n");
            raw
        }
        _ => build_request(
            "POST",
            "/events",
            &[
                ("Content-Type", "application/json"),
                ("Expect", "100-continue"),
            ],
            format!(r#"{{"type":"e","id":"fe-{k}"}}"#).as_bytes(),
        ),
    }
}

fn server() -> SocketAddr {
    static S: OnceLock<(TempDir, Server)> = OnceLock::new();
    let (_, s) = S.get_or_init(|| {
        let dir = TempDir::new("framing");
        let s = Server::start(dir.path(), &[("SHARDCAST_SERVER_CORS_ORIGINS", ORIGIN)]);
        // A first event, so a consumer position of 1 is not beyond the head.
        assert_eq!(
            s.post("/events", r#"{"type":"first","id":"f0"}"#).status,
            200
        );
        (dir, s)
    });
    s.addr
}

/// Send `stream` in the pieces `cuts` makes, close our side, and return all
/// the server wrote until it closed, less interim answers.
fn exchange(addr: SocketAddr, stream: &[u8], cuts: &[usize]) -> String {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_nodelay(true).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut at = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        let cut = cut.clamp(at, stream.len());
        c.write_all(&stream[at..cut]).unwrap();
        at = cut;
        if at < stream.len() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    c.shutdown(Shutdown::Write).unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out)
        .expect("the server closes after the last answer");
    // `100 Continue` is interim and optional: it goes out only while the
    // body has not arrived, so it depends on the split by design.
    String::from_utf8_lossy(&out).replace("HTTP/1.1 100 Continue\r\n\r\n", "")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn split_streams_get_the_answers_whole_streams_get(
        reqs in prop::collection::vec((any::<u8>(), 0u8..20), 1..10),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let stream: Vec<u8> = reqs.iter().flat_map(|&(kind, k)| request(kind, k)).collect();
        let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
        cuts.sort_unstable();
        let addr = server();
        exchange(addr, &stream, &[]); // makes every append in it a duplicate
        let whole = exchange(addr, &stream, &[]);
        let split = exchange(addr, &stream, &cuts);
        let answers = whole.matches("HTTP/1.1 ").count();
        prop_assert_eq!(answers, reqs.len(), "one answer per request:\n{}", whole);
        prop_assert_eq!(whole, split, "split at {:?}", cuts);
    }
}
