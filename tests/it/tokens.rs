//! Subscription tokens against the real binary: every refusal with its own
//! 401 code, scope enforcement in catch-up, live and reads, the per-user cap
//! across shards, expiry and a gap-free reconnect, public keys, rotation,
//! multi-tenant tokens, `shardcast token`, and the token kept out of logs.

use crate::common::*;
use serde_json::{json, Value};
use shardcast::token::{mint, signing_key, Mint};
use std::time::{Duration, Instant};

const KEY: &str = "token-test-key-0123456789";
const SECRET: &str = "token-test-secret-0123456789abcdef";

fn now() -> u64 {
    shardcast::token::now_secs()
}

/// An HS256 token for `sub` with this scope, valid for `ttl` seconds.
fn token(sub: &str, types: &[&str], streams: &[&str], ttl: u64) -> String {
    token_with(SECRET, None, sub, types, streams, ttl)
}

fn token_with(
    secret: &str,
    tenant: Option<&str>,
    sub: &str,
    types: &[&str],
    streams: &[&str],
    ttl: u64,
) -> String {
    let (key, alg) = signing_key(Some(secret), None).unwrap();
    let m = Mint {
        sub: sub.into(),
        types: types.iter().map(|s| s.to_string()).collect(),
        streams: streams.iter().map(|s| s.to_string()).collect(),
        ttl_secs: ttl,
        tenant: tenant.map(Into::into),
    };
    mint(&m, &key, alg, now()).unwrap()
}

/// A token with any claims and header, signed with HS256 and `secret`.
fn raw_token(header: Value, claims: Value, secret: &str) -> String {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let (key, _) = signing_key(Some(secret), None).unwrap();
    // Signed properly when the header asks for HS256; else a made-up signature.
    if header["alg"] == "HS256" {
        let h: jsonwebtoken::Header = serde_json::from_value(header).unwrap();
        return jsonwebtoken::encode(&h, &claims, &key).unwrap();
    }
    format!("{}.{}.c2lnbmF0dXJl", b64(&header), b64(&claims))
}

fn server(dir: &TempDir, extra: &[(&str, &str)]) -> Server {
    let mut env = vec![
        ("API_KEY", KEY),
        ("SHARDCAST_AUTH_TOKEN_SECRET", SECRET),
        ("RUST_LOG", "trace"),
    ];
    env.extend_from_slice(extra);
    Server::start(dir.path(), &env)
}

fn append(s: &Server, events: &[(&str, Option<&str>)]) {
    let batch: Vec<Value> = events
        .iter()
        .map(|(t, st)| match st {
            Some(st) => json!({"type": t, "data": {}, "stream": st}),
            None => json!({"type": t, "data": {}}),
        })
        .collect();
    let r = s.conn().post_json("/events/batch", KEY, &json!(batch));
    assert_eq!(r.status, 200, "{}", r.text());
}

fn get(s: &Server, path: &str, headers: &[(&str, &str)]) -> Response {
    s.conn().request("GET", path, headers, b"")
}

/// (position, type, stream) of each event in a JSON array answer.
fn listed(r: &Response) -> Vec<(u64, String, Option<String>)> {
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["position"].as_u64().unwrap(),
                e["type"].as_str().unwrap().to_string(),
                e["stream"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn sse_events(c: &mut SseClient, until: u64) -> Vec<(u64, String, Option<String>)> {
    c.until_id(until)
        .into_iter()
        .map(|m| {
            let v: Value = serde_json::from_str(&m.data).unwrap();
            (
                v["position"].as_u64().unwrap(),
                v["type"].as_str().unwrap().to_string(),
                v["stream"].as_str().map(str::to_string),
            )
        })
        .collect()
}

#[test]
fn every_refusal_says_which_and_the_token_stays_out_of_logs() {
    let dir = TempDir::new("tok-refuse");
    let s = server(&dir, &[]);
    append(&s, &[("chat", Some("user-1:a"))]);
    let good = token("u1", &["*"], &[], 600);
    let sub = |t: &str| format!("/events/subscribe?token={t}");
    let expect = |path: &str, headers: &[(&str, &str)], status: u16, code: &str| {
        let r = get(&s, path, headers);
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.error_code(), code, "{path}");
        // Never echoed.
        if let Some(t) = path.split("token=").nth(1) {
            assert!(!r.text().contains(t), "the answer echoes the token");
        }
        r
    };
    let claims = |extra: Value| {
        let mut c = json!({"sub": "u1", "exp": now() + 600, "types": ["*"]});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let hs = json!({"alg": "HS256", "typ": "JWT"});
    let cases: Vec<(String, &str)> = vec![
        ("not-a-jwt".into(), "invalid_token"),
        ("eyJhbGciOiJIUzI1NiJ9.e30.x".into(), "invalid_token"),
        (
            raw_token(hs.clone(), claims(json!({"exp": now() - 5})), SECRET),
            "token_expired",
        ),
        (
            raw_token(hs.clone(), claims(json!({"nbf": now() + 3600})), SECRET),
            "token_not_yet_valid",
        ),
        (
            raw_token(
                hs.clone(),
                claims(json!({})),
                "another-secret-also-32-bytes-long!",
            ),
            "invalid_token_signature",
        ),
        (
            raw_token(
                json!({"alg": "none", "typ": "JWT"}),
                claims(json!({})),
                SECRET,
            ),
            "unsupported_token_algorithm",
        ),
        (
            raw_token(json!({"alg": "HS999"}), claims(json!({})), SECRET),
            "unsupported_token_algorithm",
        ),
        (
            raw_token(json!({"alg": "RS256"}), claims(json!({})), SECRET),
            "unsupported_token_algorithm",
        ),
        (
            raw_token(hs.clone(), json!({"sub": "u1", "types": ["*"]}), SECRET),
            "invalid_token",
        ),
        (
            raw_token(
                hs.clone(),
                json!({"exp": now() + 60, "types": ["*"]}),
                SECRET,
            ),
            "invalid_token",
        ),
        (
            raw_token(hs.clone(), json!({"sub": "u1", "exp": now() + 60}), SECRET),
            "invalid_token",
        ),
    ];
    let mut presented = vec![good.clone()];
    for (t, code) in &cases {
        expect(&sub(t), &[], 401, code);
        // The same as a Bearer value (a JWT-shaped one is taken for a token).
        if t.starts_with("eyJ") {
            let bearer = format!("Bearer {t}");
            expect("/events", &[("Authorization", &bearer)], 401, code);
        }
        presented.push(t.clone());
    }
    // A good token: only reads and subscriptions.
    let c = SseClient::open(s.addr, &sub(&good), &[]);
    assert_eq!(c.status, 200);
    drop(c.stream);
    let r = s.conn().request(
        "POST",
        &format!("/events?token={good}"),
        &[("Content-Type", "application/json")],
        br#"{"type":"x","data":{}}"#,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.error_code(), "forbidden");
    let bearer = format!("Bearer {good}");
    let r = s.conn().request(
        "POST",
        "/events",
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        br#"{"type":"x","data":{}}"#,
    );
    assert_eq!(r.status, 403, "{}", r.text());
    expect("/position", &[("Authorization", &bearer)], 403, "forbidden");
    expect("/metrics", &[("Authorization", &bearer)], 403, "forbidden");
    // A token beside an API key: which one is meant?
    expect(
        &sub(&good),
        &[("X-API-Key", KEY)],
        400,
        "ambiguous_credentials",
    );
    expect(
        &format!("/events/subscribe?token={good}&api_key={KEY}"),
        &[],
        400,
        "ambiguous_credentials",
    );
    // The API key still works as before, as a Bearer value too.
    let r = get(
        &s,
        "/events",
        &[("Authorization", &format!("Bearer {KEY}"))],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Logged at trace, and no token anywhere in the log.
    let log = s.stderr();
    assert!(!log.is_empty());
    for t in &presented {
        let sig = t.rsplit('.').next().unwrap();
        assert!(
            sig.len() < 8 || !log.contains(sig),
            "a token's signature is in the log"
        );
        assert!(!log.contains(t.as_str()), "a token is in the log");
    }
}

#[test]
fn the_scope_holds_in_catch_up_live_and_every_read() {
    let dir = TempDir::new("tok-scope");
    // A small ring: the early events are caught up from SQLite, the rest live.
    let s = server(
        &dir,
        &[
            ("SHARDCAST_SSE_RING_EVENTS", "16"),
            ("SHARDCAST_SSE_CLIENT_BUFFER_EVENTS", "8"),
        ],
    );
    let mine = |t: &str, st: Option<&str>| {
        (t.starts_with("chat.")) && st.is_some_and(|s| s.starts_with("user-42:"))
    };
    let kinds: [(&str, Option<&str>); 6] = [
        ("chat.msg", Some("user-42:inbox")),
        ("chat.msg", Some("user-43:inbox")),
        ("order.placed", Some("user-42:cart")),
        ("chat.read", Some("user-42:room-1")),
        ("chat.msg", None),
        ("chat.msgx", Some("user-420:inbox")),
    ];
    let mut all: Vec<(String, Option<String>)> = Vec::new();
    for _ in 0..10 {
        append(&s, &kinds);
        all.extend(
            kinds
                .iter()
                .map(|(t, st)| (t.to_string(), st.map(str::to_string))),
        );
    }
    let expected =
        |all: &[(String, Option<String>)], from: u64, types: &dyn Fn(&str) -> bool| -> Vec<u64> {
            all.iter()
                .enumerate()
                .map(|(i, (t, st))| (i as u64 + 1, t, st))
                .filter(|(p, t, st)| *p >= from && mine(t, st.as_deref()) && types(t))
                .map(|(p, _, _)| p)
                .collect()
        };
    let t = token("u42", &["chat.*"], &["user-42:*"], 600);
    let any = |_: &str| true;

    // Catch-up from the start (SQLite, then the ring), then live.
    let mut c = SseClient::open(s.addr, &format!("/events/subscribe?token={t}&from=1"), &[]);
    if c.status != 200 {
        let status = c.status;
        panic!("{status}: {}", c.rest());
    }
    let want = expected(&all, 1, &any);
    let got = sse_events(&mut c, *want.last().unwrap());
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), want);
    append(&s, &kinds);
    all.extend(
        kinds
            .iter()
            .map(|(t, st)| (t.to_string(), st.map(str::to_string))),
    );
    let live = expected(&all, 61, &any);
    let got = sse_events(&mut c, *live.last().unwrap());
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), live);
    for (_, ty, st) in &got {
        assert!(mine(ty, st.as_deref()), "{ty} {st:?} is outside the scope");
    }

    // A filter within the scope narrows it; outside it is 403 naming the parameter.
    let mut c = SseClient::open(
        s.addr,
        &format!("/events/subscribe?token={t}&from=1&types=chat.read"),
        &[],
    );
    let want = expected(&all, 1, &|ty| ty == "chat.read");
    let got = sse_events(&mut c, *want.last().unwrap());
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), want);
    let mut c = SseClient::open(
        s.addr,
        &format!("/events/subscribe?token={t}&from=1&stream=user-42:room-*"),
        &[],
    );
    assert_eq!(c.status, 200);
    let got = c.next().unwrap();
    assert_eq!(got.event.as_deref(), Some("chat.read"));
    for (q, param) in [
        ("types=order.placed", "types"),
        ("types=chat.msg,order.*", "types"),
        ("types=*", "types"),
        ("stream=user-43:inbox", "stream"),
        ("stream=user-4*", "stream"),
    ] {
        let r = get(&s, &format!("/events/subscribe?token={t}&{q}"), &[]);
        assert_eq!(r.status, 403, "{q}: {}", r.text());
        assert_eq!(r.error_code(), "outside_token_scope");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(param),
            "{q}: {}",
            r.text()
        );
    }

    // Reads: a page, a whole range (streamed), a stream; all within the scope.
    let want = expected(&all, 1, &any);
    let page = listed(&get(&s, &format!("/events?token={t}"), &[]));
    assert_eq!(page.iter().map(|e| e.0).collect::<Vec<_>>(), want);
    let page = listed(&get(&s, &format!("/events?token={t}&from=1&limit=3"), &[]));
    assert_eq!(page.len(), 3);
    let bearer = format!("Bearer {t}");
    let range = listed(&get(
        &s,
        "/events?from=1&to=66",
        &[("Authorization", &bearer)],
    ));
    assert_eq!(range.iter().map(|e| e.0).collect::<Vec<_>>(), want);
    let replay = listed(&get(
        &s,
        "/events/stream?batch_size=2",
        &[("Authorization", &bearer)],
    ));
    assert_eq!(replay.iter().map(|e| e.0).collect::<Vec<_>>(), want);
    let typed = listed(&get(&s, &format!("/events?token={t}&type=chat.read"), &[]));
    assert_eq!(
        typed.iter().map(|e| e.0).collect::<Vec<_>>(),
        expected(&all, 1, &|ty| ty == "chat.read")
    );
    let r = get(&s, &format!("/events?token={t}&type=order.placed"), &[]);
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "outside_token_scope");
    let stream = listed(&get(&s, &format!("/streams/user-42:inbox?token={t}"), &[]));
    assert_eq!(stream.len(), 11);
    assert!(stream.iter().all(|(_, ty, _)| ty == "chat.msg"));
    // In the scope's streams, but its order events are not in its types.
    let cart = listed(&get(&s, &format!("/streams/user-42:cart?token={t}"), &[]));
    assert!(cart.is_empty(), "{cart:?}");
    let r = get(&s, &format!("/streams/user-43:inbox?token={t}"), &[]);
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "outside_token_scope");
}

#[test]
fn the_per_user_cap_is_exact_across_shards() {
    let dir = TempDir::new("tok-cap");
    let s = server(
        &dir,
        &[
            ("SHARDCAST_SERVER_SHARDS", "2"),
            ("SHARDCAST_SSE_MAX_PER_USER", "4"),
        ],
    );
    let alice = token("alice", &["*"], &[], 600);
    let path = format!("/events/subscribe?token={alice}");
    // 4 held; 12 more attempts on new connections, which the kernel spreads
    // over both shards: a per-shard count would admit up to 8.
    let mut held: Vec<SseClient> = (0..4)
        .map(|_| SseClient::open(s.addr, &path, &[]))
        .collect();
    assert!(held.iter().all(|c| c.status == 200));
    for _ in 0..12 {
        let mut c = SseClient::open(s.addr, &path, &[]);
        let status = c.status;
        assert_eq!(status, 429, "{}", c.rest());
        assert!(
            c.head.to_ascii_lowercase().contains("retry-after:"),
            "{}",
            c.head
        );
        let body: Value = serde_json::from_str(&c.rest()).unwrap();
        assert_eq!(body["error"]["code"], "too_many_subscriptions");
    }
    // Another user is counted apart; so are API-key subscriptions.
    let bob = token("bob", &["*"], &[], 600);
    let c = SseClient::open(s.addr, &format!("/events/subscribe?token={bob}"), &[]);
    assert_eq!(c.status, 200);
    // One of alice's leaves: her place comes back.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = SseClient::open(s.addr, &path, &[]);
        if c.status == 200 {
            held.push(c);
            break;
        }
        assert!(Instant::now() < deadline, "the place never came back");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut c = SseClient::open(s.addr, &path, &[]);
    let status = c.status;
    assert_eq!(status, 429, "{}", c.rest());
}

#[test]
fn expiry_ends_the_stream_and_a_renewed_token_resumes_without_a_gap() {
    let dir = TempDir::new("tok-expiry");
    let s = server(&dir, &[]);
    append(&s, &[("t", None)]);
    // A publisher that keeps appending while the token runs out.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        let addr = s.addr;
        std::thread::spawn(move || {
            let mut conn = Conn::open(addr);
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = conn.post_json("/events", KEY, &json!({"type": "t", "data": {}}));
                assert_eq!(r.status, 200);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let t = token("u", &["*"], &[], 2);
    let mut c = SseClient::open(s.addr, &format!("/events/subscribe?token={t}&from=1"), &[]);
    assert_eq!(c.status, 200);
    let started = Instant::now();
    let mut seen = Vec::new();
    let resume = loop {
        let m = c
            .next()
            .expect("the stream ends with token_expired, not silently");
        if m.event.as_deref() == Some("token_expired") {
            let v: Value = serde_json::from_str(&m.data).unwrap();
            assert_eq!(v["reason"], "token_expired");
            break v["last_event_id"].as_u64().unwrap();
        }
        seen.push(m.id.unwrap().parse::<u64>().unwrap());
    };
    let lived = started.elapsed();
    assert!(
        lived < Duration::from_secs(5),
        "ended {lived:?} after a 2 s token"
    );
    assert!(
        c.next().is_none(),
        "the connection closes after token_expired"
    );
    assert!(resume >= *seen.last().unwrap());
    // The expired token is refused from now on.
    let r = get(&s, &format!("/events/subscribe?token={t}"), &[]);
    assert_eq!(r.error_code(), "token_expired");
    // A fresh token, resumed from where the stream ended.
    let fresh = token("u", &["*"], &[], 600);
    let mut c = SseClient::open(
        s.addr,
        &format!("/events/subscribe?token={fresh}"),
        &[("Last-Event-ID", &resume.to_string())],
    );
    assert_eq!(c.status, 200);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = publisher.join().unwrap();
    for m in c.until_id(last) {
        seen.push(m.id.unwrap().parse::<u64>().unwrap());
    }
    assert_eq!(
        seen,
        (1..=last).collect::<Vec<_>>(),
        "every position once, in order"
    );
}

/// An RSA and an EC P-256 key pair, made by openssl: (private, public) PEM paths.
fn openssl_keys(dir: &std::path::Path, name: &str, args: &[&str]) -> (String, String) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let ok = std::process::Command::new("openssl")
        .args(args)
        .arg("-out")
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl {args:?}");
    let ok = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    (private.display().to_string(), public.display().to_string())
}

fn cli_token(dir: &std::path::Path, env: &[(&str, &str)], args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("token")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .current_dir(dir)
        .output()
        .unwrap()
}

#[test]
#[cfg_attr(not(tool_openssl), ignore = "needs openssl (apt-get install openssl)")]
fn public_keys_verify_rs256_and_es256_and_rotate() {
    let dir = TempDir::new("tok-pk");
    let (rsa_key, rsa_pub) = openssl_keys(
        dir.path(),
        "rsa",
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
    );
    let (ec_key, ec_pub) = openssl_keys(
        dir.path(),
        "ec",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
    );
    // Both public keys in one file: two keys, as during a rotation.
    let both = dir.path().join("both.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(&rsa_pub).unwrap() + &std::fs::read_to_string(&ec_pub).unwrap(),
    )
    .unwrap();
    let both = both.display().to_string();
    let s = Server::start(
        dir.path(),
        &[("API_KEY", KEY), ("SHARDCAST_AUTH_TOKEN_PUBLIC_KEY", &both)],
    );
    append(&s, &[("a", None), ("b", None)]);
    let env = [("SHARDCAST_AUTH_TOKEN_PUBLIC_KEY", both.as_str())];
    for key in [&rsa_key, &ec_key] {
        let out = cli_token(
            dir.path(),
            &env,
            &["--sub", "u", "--types", "b", "--private-key", key],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
        let page = listed(&get(&s, &format!("/events?token={t}"), &[]));
        assert_eq!(
            page.iter().map(|e| e.0).collect::<Vec<_>>(),
            vec![2],
            "{key}"
        );
    }
    // Only public keys configured: an HS256 token has no key here.
    let t = token("u", &["*"], &[], 60);
    let r = get(&s, &format!("/events?token={t}"), &[]);
    assert_eq!(r.error_code(), "unsupported_token_algorithm");
    // A key pair that is not configured.
    let (other, _) = openssl_keys(
        dir.path(),
        "other",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
    );
    let out = cli_token(
        dir.path(),
        &env,
        &["--sub", "u", "--types", "*", "--private-key", &other],
    );
    let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let r = get(&s, &format!("/events?token={t}"), &[]);
    assert_eq!(r.error_code(), "invalid_token_signature");
}

#[test]
fn secrets_rotate_and_the_cli_mints_from_the_config() {
    let dir = TempDir::new("tok-rotate");
    let old = "the-previous-secret-0123456789abcdef";
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", KEY),
            ("SHARDCAST_AUTH_TOKEN_SECRET", SECRET),
            ("SHARDCAST_AUTH_TOKEN_SECRET_PREVIOUS", old),
        ],
    );
    append(&s, &[("a", Some("s1"))]);
    for secret in [SECRET, old] {
        let t = token_with(secret, None, "u", &[], &["s1"], 60);
        assert_eq!(
            listed(&get(&s, &format!("/events?token={t}"), &[])).len(),
            1
        );
    }
    let t = token_with(
        "a-third-secret-0123456789abcdef!!",
        None,
        "u",
        &["*"],
        &[],
        60,
    );
    assert_eq!(
        get(&s, &format!("/events?token={t}"), &[]).error_code(),
        "invalid_token_signature"
    );
    // `shardcast token` signs with the configured secret.
    let env = [("SHARDCAST_AUTH_TOKEN_SECRET", SECRET)];
    let out = cli_token(
        dir.path(),
        &env,
        &["--sub", "u9", "--streams", "s1,s2", "--ttl", "90s"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(
        listed(&get(&s, &format!("/events?token={t}"), &[])).len(),
        1
    );
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&t).unwrap();
    assert_eq!(claims["sub"], "u9");
    assert_eq!(claims["streams"], json!(["s1", "s2"]));
    let ttl = claims["exp"].as_f64().unwrap() - claims["iat"].as_f64().unwrap();
    assert_eq!(ttl, 90.0);
    // Without a secret, or without a scope: a clear error, exit code 2.
    let out = cli_token(dir.path(), &[], &["--sub", "u", "--types", "*"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("token_secret"));
    let out = cli_token(dir.path(), &env, &["--sub", "u"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn each_tenant_verifies_its_own_tokens() {
    let dir = TempDir::new("tok-tenants");
    let data = dir.path().join("tenants");
    let yaml = dir.path().join("tenants.yaml");
    let (sa, sb) = (
        "tenant-a-token-secret-0123456789ab",
        "tenant-b-token-secret-0123456789ab",
    );
    std::fs::write(
        &yaml,
        format!(
            "data_dir: {}\ntenants:\n  - name: a\n    api_key: key-a-0123456789\n    token_secret: {sa}\n  - name: b\n    api_key: key-b-0123456789\n    token_secret: {sb}\n  - name: c\n    api_key: key-c-0123456789\n",
            data.display()
        ),
    )
    .unwrap();
    let yaml_s = yaml.display().to_string();
    let s = Server::start_with_args(dir.path(), &["--tenants", &yaml_s], &[]);
    for (k, ty) in [("key-a-0123456789", "in-a"), ("key-b-0123456789", "in-b")] {
        let r = s
            .conn()
            .post_json("/events", k, &json!({"type": ty, "data": {}}));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let ta = token_with(sa, Some("a"), "u", &["*"], &[], 60);
    let page = listed(&get(&s, &format!("/events?token={ta}"), &[]));
    assert_eq!(page, vec![(1, "in-a".to_string(), None)]);
    // Signed with a's secret but claiming b: b's secret does not verify it.
    let forged = token_with(sa, Some("b"), "u", &["*"], &[], 60);
    assert_eq!(
        get(&s, &format!("/events?token={forged}"), &[]).error_code(),
        "invalid_token_signature"
    );
    // No tenant claim; a tenant without token keys; an unknown tenant.
    let none = token_with(sa, None, "u", &["*"], &[], 60);
    assert_eq!(
        get(&s, &format!("/events?token={none}"), &[]).error_code(),
        "invalid_token"
    );
    for t in ["c", "nobody"] {
        let tok = token_with(sa, Some(t), "u", &["*"], &[], 60);
        let r = get(&s, &format!("/events?token={tok}"), &[]);
        assert_eq!(r.status, 401);
        assert_eq!(r.error_code(), "tokens_not_accepted");
    }
    // The CLI mints for a tenant from the tenants file.
    let out = cli_token(
        dir.path(),
        &[],
        &[
            "--tenants",
            &yaml_s,
            "--tenant",
            "b",
            "--sub",
            "u",
            "--types",
            "*",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tb = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let page = listed(&get(&s, &format!("/events?token={tb}"), &[]));
    assert_eq!(page, vec![(1, "in-b".to_string(), None)]);
}

#[test]
fn a_reload_rotates_the_secret_without_a_restart() {
    let dir = TempDir::new("tok-reload");
    let (a, b) = (
        "secret-a-0123456789abcdef0123456789",
        "secret-b-0123456789abcdef0123456789",
    );
    let cfg = dir.path().join("shardcast.toml");
    let write = |secret: &str, previous: &str| {
        std::fs::write(
            &cfg,
            format!("[auth]\napi_key = \"{KEY}\"\ntoken_secret = \"{secret}\"\ntoken_secret_previous = \"{previous}\"\n"),
        )
        .unwrap()
    };
    write(a, "");
    let cfg_s = cfg.display().to_string();
    let s = Server::start_with_args(dir.path(), &["--config", &cfg_s], &[]);
    append(&s, &[("t", None)]);
    let code = |secret: &str| {
        let t = token_with(secret, None, "u", &["*"], &[], 60);
        let r = get(&s, &format!("/events?token={t}"), &[]);
        if r.status == 200 {
            "ok".to_string()
        } else {
            r.error_code()
        }
    };
    let reload_until = |secret: &str, want: &str| {
        unsafe { libc::kill(s.pid(), libc::SIGHUP) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while code(secret) != want {
            assert!(Instant::now() < deadline, "the reload did not take");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(code(a), "ok");
    assert_eq!(code(b), "invalid_token_signature");
    // Step 1: the new secret, the old one still accepted.
    write(b, a);
    reload_until(b, "ok");
    assert_eq!(code(a), "ok");
    // Step 3: the old one removed.
    write(b, "");
    reload_until(a, "invalid_token_signature");
    assert_eq!(code(b), "ok");
}
