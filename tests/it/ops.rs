//! Seeing inside a running server: `/metrics` (Prometheus text that parses,
//! counters that move with traffic, ebuse's JSON) and `/health` readiness.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const KEY: &str = "ops-key-0123456789";

/// A sample: metric name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// Parse the Prometheus text exposition format 0.0.4 strictly enough to
/// catch what a scraper would refuse: every sample belongs to a family
/// declared by `# TYPE` before it, names and labels are well-formed, values
/// parse, no series appears twice, and histograms' buckets are cumulative
/// with `+Inf` equal to `_count`.
fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    };
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(name_ok(name), "bad family name {name}");
            assert!(
                ["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind),
                "bad type {kind}"
            );
            assert!(
                types.insert(name.to_string(), kind.to_string()).is_none(),
                "family {name} declared twice"
            );
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels = Vec::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    assert!(name_ok(k), "bad label name {k} in {line}");
                    labels.push((k.to_string(), v.trim_end_matches('"').to_string()));
                }
                (n.to_string(), labels)
            }
            None => (series.to_string(), Vec::new()),
        };
        assert!(name_ok(&name), "bad metric name in {line}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(&name)
            .to_string();
        assert!(
            types.contains_key(&family),
            "{name} has no # TYPE before it"
        );
        assert!(
            seen.insert(series.to_string()),
            "series {series} appears twice"
        );
        samples.push((name, labels, value));
    }
    // Histograms: cumulative buckets, +Inf == _count.
    for (family, _) in types.iter().filter(|(_, t)| *t == "histogram") {
        let mut by_series: HashMap<String, Vec<(f64, f64)>> = HashMap::new();
        for (n, labels, v) in &samples {
            if *n == format!("{family}_bucket") {
                let le = labels
                    .iter()
                    .find(|(k, _)| k == "le")
                    .expect("le")
                    .1
                    .clone();
                let rest: Vec<String> = labels
                    .iter()
                    .filter(|(k, _)| k != "le")
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let le: f64 = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap()
                };
                by_series.entry(rest.join(",")).or_default().push((le, *v));
            }
        }
        for (rest, buckets) in by_series {
            assert!(
                buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
                "{family}{{{rest}}} buckets not cumulative"
            );
            let inf = buckets.last().unwrap();
            assert!(inf.0.is_infinite(), "{family} lacks +Inf");
            let count = samples
                .iter()
                .find(|(n, labels, _)| {
                    *n == format!("{family}_count")
                        && labels
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(",")
                            == rest
                })
                .expect("_count")
                .2;
            assert_eq!(inf.1, count, "{family}{{{rest}}} +Inf != count");
        }
    }
    samples
}

fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(a, b)| a == k && b == v))
        })
        .map(|s| s.2)
        .unwrap_or(0.0)
}

/// What Prometheus sends as `Accept` when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

fn scrape(s: &Server) -> Vec<Sample> {
    let r = s.conn().request(
        "GET",
        "/metrics",
        &[("X-API-Key", KEY), ("Accept", PROMETHEUS_ACCEPT)],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("Content-Type")
        .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")));
    parse_exposition(&r.text())
}

#[test]
fn metrics_parse_as_prometheus_and_move_with_traffic() {
    let dir = TempDir::new("ops-metrics");
    let s = Server::start(
        dir.path(),
        &[("API_KEY", KEY), ("SHARDCAST_SERVER_SHARDS", "2")],
    );
    let before = scrape(&s);
    let mut sub = SseClient::open(s.addr, "/events/subscribe", &[("X-API-Key", KEY)]);
    assert_eq!(sub.status, 200);
    for i in 0..10 {
        let r = s
            .conn()
            .post_json("/events", KEY, &json!({"type":"m","data":{"i":i}}));
        assert_eq!(r.status, 200);
    }
    let batch: Vec<Value> = (0..40).map(|_| json!({"type":"m"})).collect();
    assert_eq!(
        s.conn()
            .post_json("/events/batch", KEY, &Value::Array(batch))
            .status,
        200
    );
    assert_eq!(sub.until_id(50).len(), 50);
    for _ in 0..3 {
        assert_eq!(s.get("/position").status, 401);
    }
    let after = scrape(&s);
    let d = |name: &str, labels: &[(&str, &str)]| {
        value(&after, name, labels) - value(&before, name, labels)
    };
    assert_eq!(
        d(
            "shardcast_http_requests_total",
            &[("endpoint", "append"), ("status", "200")]
        ),
        10.0
    );
    assert_eq!(
        d(
            "shardcast_http_requests_total",
            &[("endpoint", "append_batch"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        d(
            "shardcast_http_requests_total",
            &[("endpoint", "other"), ("status", "401")]
        ),
        3.0
    );
    assert_eq!(
        d(
            "shardcast_http_request_duration_seconds_count",
            &[("endpoint", "append")]
        ),
        10.0
    );
    assert_eq!(
        d("shardcast_events_appended_total", &[("tenant", "default")]),
        50.0
    );
    assert_eq!(
        value(&after, "shardcast_head_position", &[("tenant", "default")]),
        50.0
    );
    assert_eq!(
        d(
            "shardcast_sse_events_delivered_total",
            &[("tenant", "default")]
        ),
        50.0
    );
    assert_eq!(
        value(
            &after,
            "shardcast_sse_connections",
            &[("tenant", "default")]
        ),
        1.0
    );
    // Two shards report; the writer's histograms counted the commits.
    assert!(after
        .iter()
        .any(|(n, l, _)| n == "shardcast_connections_open"
            && l.iter().any(|(k, v)| k == "shard" && v == "1")));
    assert!(d("shardcast_group_commit_events_count", &[]) >= 2.0);
    assert!(value(&after, "shardcast_group_commit_events_sum", &[]) >= 50.0);
    assert!(value(&after, "shardcast_process_open_fds", &[]) > 5.0);
    assert!(value(&after, "shardcast_process_resident_memory_bytes", &[]) > 1e6);

    // ebuse's JSON unless the scraper asks for text: no Accept (ebuse's
    // documented call), `*/*` (curl), application/json, or ?format=json.
    for accept in [None, Some("*/*"), Some("application/json")] {
        let mut headers = vec![("X-API-Key", KEY)];
        headers.extend(accept.map(|a| ("Accept", a)));
        let r = s.conn().request("GET", "/metrics", &headers, b"");
        assert_eq!(
            r.header("Content-Type"),
            Some("application/json"),
            "{accept:?}"
        );
        assert_eq!(r.json()["total_events"], 50, "{accept:?}");
    }
    let text = s
        .conn()
        .request(
            "GET",
            "/metrics?format=prometheus",
            &[("X-API-Key", KEY)],
            b"",
        )
        .text();
    assert!(text.contains("# TYPE"), "{text}");
    let j = s
        .conn()
        .request(
            "GET",
            "/metrics",
            &[("X-API-Key", KEY), ("Accept", "application/json")],
            b"",
        )
        .json();
    assert_eq!(j["total_events"], 50);
    assert!(j["timestamp"].as_u64().unwrap() > 1_700_000_000);
    assert!(
        j.get("tenant").is_none(),
        "single-tenant mode names no tenant"
    );
    assert_eq!(
        s.get_with_key("/metrics?format=json", KEY)["sse_connections"],
        1
    );
    // Like every endpoint but /health, it needs a key.
    assert_eq!(s.get("/metrics").status, 401);
}

#[test]
fn metrics_of_a_tenant_are_its_own() {
    let dir = TempDir::new("ops-metrics-tenants");
    let f = dir.path().join("tenants.yaml");
    std::fs::write(
        &f,
        format!(
            "data_dir: {}\nadmin_api_key: ops-admin-key-0123\ntenants:\n  - name: alice\n    api_key: ops-alice-key-0123\n  - name: bob\n    api_key: ops-bob-key-01234\n",
            dir.path().join("t").display()
        ),
    )
    .unwrap();
    let s = Server::start(
        dir.path(),
        &[("SHARDCAST_AUTH_TENANTS_FILE", f.to_str().unwrap())],
    );
    for _ in 0..3 {
        s.conn()
            .post_json("/events", "ops-alice-key-0123", &json!({"type":"a"}));
    }
    s.conn()
        .post_json("/events", "ops-bob-key-01234", &json!({"type":"b"}));
    let j = s.get_with_key("/metrics?format=json", "ops-alice-key-0123");
    assert_eq!(
        (j["tenant"].as_str(), j["total_events"].as_u64()),
        (Some("alice"), Some(3))
    );
    let text = s
        .conn()
        .request(
            "GET",
            "/metrics",
            &[
                ("X-API-Key", "ops-alice-key-0123"),
                ("Accept", PROMETHEUS_ACCEPT),
            ],
            b"",
        )
        .text();
    parse_exposition(&text);
    assert!(text.contains("shardcast_head_position{tenant=\"alice\"} 3"));
    assert!(
        !text.contains("bob"),
        "a tenant sees no other tenant: {text}"
    );
    let all = s
        .conn()
        .request(
            "GET",
            "/metrics",
            &[
                ("X-API-Key", "ops-admin-key-0123"),
                ("Accept", "text/plain"),
            ],
            b"",
        )
        .text();
    assert!(all.contains("shardcast_head_position{tenant=\"bob\"} 1"));
    let j = s.get_with_key("/metrics?format=json", "ops-admin-key-0123");
    assert_eq!(j["total_events"], 4);
    assert_eq!(j["tenants"].as_array().unwrap().len(), 2);
}

#[test]
fn readiness_turns_503_when_storage_cannot_take_writes() {
    let dir = TempDir::new("ops-ready");
    let s = Server::start(
        dir.path(),
        &[
            ("API_KEY", KEY),
            ("SHARDCAST_STORAGE_MAX_DATABASE_BYTES", "131072"),
        ],
    );
    let ready = s.get("/health?mode=readiness");
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["status"], "ready");
    // Fill the database to its cap: appends get 507 from then on.
    let t0 = Instant::now();
    loop {
        let evs: Vec<Value> = (0..20)
            .map(|_| json!({"type":"fill","data":{"pad":"x".repeat(500)}}))
            .collect();
        let r = s.conn().post_json("/events/batch", KEY, &Value::Array(evs));
        if r.status == 507 {
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(t0.elapsed() < Duration::from_secs(30));
    }
    let r = s.get("/health?mode=readiness");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (503, "not_ready"),
        "{}",
        r.text()
    );
    assert!(r.header("Retry-After").is_some());
    // Without the key: that it is not ready, not why (reasons carry paths).
    assert!(r.text().contains("1 tenant(s)"), "{}", r.text());
    assert!(!r.text().contains("full"), "{}", r.text());
    // With it, why.
    let r = s
        .conn()
        .request("GET", "/health?mode=readiness", &[("X-API-Key", KEY)], b"");
    assert_eq!(r.status, 503);
    assert!(r.text().contains("full"), "{}", r.text());
    // Liveness is another question: the process answers.
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(s.get("/health?mode=sometimes").status, 400);
}

/// The checker above must be able to fail.
#[test]
#[should_panic(expected = "no # TYPE")]
fn the_exposition_checker_refuses_an_undeclared_family() {
    parse_exposition("# TYPE a counter\na 1\nb 2\n");
}

#[test]
#[should_panic(expected = "not cumulative")]
fn the_exposition_checker_refuses_shrinking_buckets() {
    parse_exposition(
        "# TYPE h histogram\nh_bucket{le=\"1\"} 5\nh_bucket{le=\"2\"} 3\nh_bucket{le=\"+Inf\"} 5\nh_sum 1\nh_count 5\n",
    );
}
