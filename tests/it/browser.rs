//! A browser's view: a page in headless Chromium opens an `EventSource` on
//! shardcast (cross-origin, so CORS is exercised too), receives live events,
//! and, after the server is restarted, reconnects by itself with
//! `Last-Event-ID` and receives what was published while it was away.
//!
//! Every event's `data` holds raw CR, CRLF and LF between its JSON tokens:
//! Chromium ends an SSE line at any of them, so each must start a new
//! `data:` line or the page's `JSON.parse` fails and the event goes missing.
//!
//! A second page subscribes with a per-user subscription token from its
//! "backend" and renews it when the stream says `token_expired`, as
//! docs/sse.md shows.
//!
//! The page reports what it received to a small HTTP server inside this test.
//! Ignored where Chromium is not installed, except under CI (`.ci/run`
//! installs it), where it fails instead.

use crate::common::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const KEY: &str = "browser-key-0123456789";

fn chromium() -> Option<&'static str> {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
}

/// Serve the page, and pass on every `/report?…` query the page sends.
fn page_server(page: String) -> (u16, mpsc::Receiver<String>) {
    page_server_with(page, None)
}

/// A token the page's "backend" hands out at `/token`.
type TokenSource = Box<dyn Fn() -> String + Send>;

/// `page_server`, with `/token` answered by `token` (the app's backend
/// minting a subscription token for its user).
fn page_server_with(page: String, token: Option<TokenSource>) -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            // Drain the head.
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                    break;
                }
            }
            let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
            let body = if let Some(q) = target.strip_prefix("/report?") {
                let _ = tx.send(q.to_string());
                String::new()
            } else if let (Some(t), true) = (&token, target.starts_with("/token")) {
                let _ = tx.send("token".to_string());
                t()
            } else {
                page.clone()
            };
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                body.len(),
                body
            );
        }
    });
    (port, rx)
}

/// Wait for a report whose `ids=` list has every id in `want`.
fn wait_for(rx: &mpsc::Receiver<String>, want: &[u64], within: Duration) -> Vec<u64> {
    let until = Instant::now() + within;
    let mut last = Vec::new();
    while Instant::now() < until {
        if let Ok(q) = rx.recv_timeout(Duration::from_millis(200)) {
            if let Some(ids) = q.strip_prefix("ids=") {
                last = ids
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.parse().unwrap())
                    .collect();
                if want.iter().all(|w| last.contains(w)) {
                    return last;
                }
            }
        }
    }
    panic!("the page did not report {want:?}; last report {last:?}");
}

#[test]
#[cfg_attr(
    not(tool_chromium),
    ignore = "needs Chromium (apt-get install chromium)"
)]
fn an_eventsource_in_chromium_receives_live_events_and_resumes_after_a_restart() {
    let sc_port = fixed_port();
    let page = format!(
        r#"<!doctype html><meta charset="utf-8"><title>shardcast</title><script>
const ids = [];
const es = new EventSource("http://127.0.0.1:{sc_port}/events/subscribe?api_key={KEY}&types=greeting");
es.addEventListener("greeting", (m) => {{
  const v = JSON.parse(m.data);
  if (String(v.position) !== m.lastEventId) throw new Error("id is not the position");
  if (v.data.hello !== "world") throw new Error("data arrived changed");
  ids.push(v.position);
  fetch("/report?ids=" + ids.join(","));
}});
</script>"#
    );
    let (page_port, reports) = page_server(page);
    let dir = TempDir::new("browser");
    let origin = format!("http://127.0.0.1:{page_port}");
    let port_s = sc_port.to_string();
    let env = [
        ("API_KEY", KEY),
        ("PORT", port_s.as_str()),
        ("SHARDCAST_SERVER_CORS_ORIGINS", origin.as_str()),
        ("SHARDCAST_SSE_RETRY_MS", "300"),
    ];
    let mut s = Server::start(dir.path(), &env);
    let _browser = browse(&format!("http://127.0.0.1:{page_port}/"));

    let post = |s: &Server, t: &str| {
        let r = s.conn().request(
            "POST",
            "/events",
            &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
            format!("{{\"type\":\"{t}\",\"data\":\r{{\"hello\":\r\n\"world\"\n}}\r}}").as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["position"].as_u64().unwrap()
    };
    // The page connects live; publish until it reports a greeting (the first
    // ones may be published before its EventSource is open).
    let until = Instant::now() + Duration::from_secs(60);
    let mut first = Vec::new();
    loop {
        assert!(Instant::now() < until, "the page never reported an event");
        post(&s, "other");
        first.push(post(&s, "greeting"));
        if let Ok(q) = reports.recv_timeout(Duration::from_millis(500)) {
            if q.starts_with("ids=") {
                break;
            }
        }
    }
    // One more, live, with the page surely connected.
    first.push(post(&s, "greeting"));
    let seen_live = wait_for(&reports, &[*first.last().unwrap()], Duration::from_secs(30));
    assert!(
        seen_live.iter().all(|p| first.contains(p)),
        "only greetings: {seen_live:?}"
    );

    // Restart the server; publish while the page is disconnected.
    assert!(s.terminate(Duration::from_secs(15)).success());
    s.restart();
    let missed = [post(&s, "greeting"), post(&s, "greeting")];
    let all = wait_for(&reports, &missed, Duration::from_secs(30));
    // Resumed from Last-Event-ID: nothing twice, nothing skipped after the first seen.
    let mut sorted = all.clone();
    sorted.dedup();
    assert_eq!(sorted, all, "no duplicates: {all:?}");
    let start = all[0];
    let want: Vec<u64> = first
        .iter()
        .chain(missed.iter())
        .copied()
        .filter(|p| *p >= start)
        .collect();
    assert_eq!(all, want, "every greeting from the first seen on, in order");
}

/// Headless Chromium on a page; killed when dropped, then its profile removed.
struct Browser {
    child: std::process::Child,
    _profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn browse(url: &str) -> Browser {
    let chrome = chromium().expect("Chromium is not installed (apt-get install chromium)");
    let profile = TempDir::new("chromium-profile-token");
    let child = Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    Browser {
        child,
        _profile: profile,
    }
}

/// The pattern docs/sse.md gives: the page gets a short-lived token from
/// its backend, subscribes with it, and when the stream says
/// `token_expired`, fetches a fresh one and resumes from `last_event_id`.
/// It must see its own user's events only, each once, across renewals.
#[test]
#[cfg_attr(
    not(tool_chromium),
    ignore = "needs Chromium (apt-get install chromium)"
)]
fn a_page_with_a_subscription_token_sees_its_own_events_and_resumes_after_renewal() {
    const SECRET: &str = "browser-token-secret-0123456789ab";
    let sc_port = fixed_port();
    let page = format!(
        r#"<!doctype html><meta charset="utf-8"><title>tokens</title><script>
const ids = [];
let last = null, renewals = 0;
async function connect() {{
  const token = await (await fetch("/token")).text();
  const url = new URL("http://127.0.0.1:{sc_port}/events/subscribe");
  url.searchParams.set("token", token);
  if (last !== null) url.searchParams.set("last_event_id", last);
  const es = new EventSource(url);
  es.addEventListener("chat", (m) => {{
    const v = JSON.parse(m.data);
    if (!v.stream.startsWith("user-42:")) throw new Error("not mine: " + v.stream);
    ids.push(v.position);
    fetch("/report?ids=" + ids.join(",") + "&renewals=" + renewals);
  }});
  es.addEventListener("token_expired", (m) => {{
    es.close();
    last = JSON.parse(m.data).last_event_id;
    renewals += 1;
    connect();
  }});
}}
connect();
</script>"#
    );
    let mint: TokenSource = Box::new(|| {
        let (key, alg) = shardcast::token::signing_key(Some(SECRET), None).unwrap();
        let m = shardcast::token::Mint {
            sub: "user-42".into(),
            types: vec![],
            streams: vec!["user-42:*".into()],
            ttl_secs: 2,
            tenant: None,
        };
        shardcast::token::mint(&m, &key, alg, shardcast::token::now_secs()).unwrap()
    });
    let (page_port, reports) = page_server_with(page, Some(mint));
    let dir = TempDir::new("browser-token");
    let origin = format!("http://127.0.0.1:{page_port}");
    let port_s = sc_port.to_string();
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", KEY),
            ("PORT", port_s.as_str()),
            ("SHARDCAST_SERVER_CORS_ORIGINS", origin.as_str()),
            ("SHARDCAST_AUTH_TOKEN_SECRET", SECRET),
        ],
    );
    let _browser = browse(&format!("http://127.0.0.1:{page_port}/"));
    let post = |stream: &str| {
        let body = format!(r#"{{"type":"chat","data":{{"m":1}},"stream":"{stream}"}}"#);
        let r = s.conn().request(
            "POST",
            "/events",
            &[("Content-Type", "application/json"), ("X-API-Key", KEY)],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["position"].as_u64().unwrap()
    };
    // Publish for user-42 and user-43 until the page reports, then for ~7 s
    // more: three or more 2-second tokens expire on the way.
    let until = Instant::now() + Duration::from_secs(60);
    let mut mine = Vec::new();
    let mut report = String::new();
    loop {
        assert!(Instant::now() < until, "the page never reported an event");
        post("user-43:inbox");
        mine.push(post("user-42:inbox"));
        if let Ok(q) = reports.recv_timeout(Duration::from_millis(300)) {
            if q.starts_with("ids=") {
                break;
            }
        }
    }
    let busy = Instant::now() + Duration::from_secs(7);
    while Instant::now() < busy {
        post("user-43:inbox");
        mine.push(post("user-42:inbox"));
        std::thread::sleep(Duration::from_millis(100));
    }
    let all = {
        let until = Instant::now() + Duration::from_secs(30);
        let want = *mine.last().unwrap();
        loop {
            assert!(Instant::now() < until, "the page stopped at {report}");
            let Ok(q) = reports.recv_timeout(Duration::from_millis(500)) else {
                continue;
            };
            let Some(rest) = q.strip_prefix("ids=") else {
                continue;
            };
            report = rest.to_string();
            let (ids, _) = rest.split_once('&').unwrap();
            let ids: Vec<u64> = ids.split(',').map(|s| s.parse().unwrap()).collect();
            if ids.last() == Some(&want) {
                break ids;
            }
        }
    };
    let renewals: u32 = report.rsplit("renewals=").next().unwrap().parse().unwrap();
    assert!(
        renewals >= 2,
        "tokens were renewed {renewals} times: {report}"
    );
    let start = all[0];
    let want: Vec<u64> = mine.iter().copied().filter(|p| *p >= start).collect();
    assert_eq!(
        all, want,
        "user-42's events from the first seen on, once each, in order"
    );
}
