//! Metrics: counted where they happen, summed only when scraped.
//!
//! Each shard counts its requests (by endpoint and status), their latency,
//! its rate-limit refusals, and each tenant's SSE connections and
//! deliveries in plain `Cell`s of its own; the writer counts commits, batch
//! sizes, commit latency, SQLite busy retries and each tenant's appends on
//! its own thread. Nothing is shared between cores on the request path: a
//! scrape asks every shard and the writer for a snapshot over their control
//! channels, adds them up, and renders the Prometheus text format (or
//! ebuse's JSON).

use crate::tenant::TenantId;
use std::cell::RefCell;
use std::fmt::Write as _;

/// Request latency buckets, in microseconds (rendered in seconds).
pub const LATENCY_BUCKETS_US: &[u64] = &[
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 5_000_000,
];

/// Events-per-commit buckets.
pub const BATCH_BUCKETS: &[u64] = &[1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000];

/// Endpoint labels; a route's index is its `Route::metric_index`. Requests
/// refused before their route is known (404, 401, 429, bad HTTP) count as
/// `other`.
pub const ENDPOINTS: &[&str] = &[
    "health",
    "position",
    "append",
    "append_batch",
    "subscribe",
    "load",
    "stream",
    "stream_read",
    "consumer_get",
    "consumer_set",
    "tenants",
    "metrics",
    "other",
];

/// The `other` endpoint label's index.
pub const OTHER: usize = ENDPOINTS.len() - 1;

/// A histogram with fixed buckets: counts per bucket (not cumulative; the
/// last is above every bound), their sum and count.
#[derive(Debug, Clone, Default)]
pub struct Histogram {
    counts: Vec<u64>,
    sum: u64,
}

impl Histogram {
    pub fn observe(&mut self, bounds: &[u64], v: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len() + 1];
        }
        let i = bounds.partition_point(|b| *b < v);
        self.counts[i] += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; other.counts.len()];
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a += b;
        }
        self.sum += other.sum;
    }

    /// Prometheus lines: `_bucket{le}` cumulative, `_sum`, `_count`. `scale`
    /// divides bounds and sum (1e6 renders microseconds as seconds).
    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[u64], scale: f64) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in bounds.iter().enumerate() {
            cum += self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cum}",
                *b as f64 / scale
            );
        }
        let total = self.count();
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {total}");
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum as f64 / scale);
        let _ = writeln!(out, "{name}_count{braces} {total}");
    }
}

/// One shard's request counters.
#[derive(Debug, Clone, Default)]
pub struct RequestCounts {
    /// Per endpoint: (status, count), a handful each.
    pub by_status: Vec<Vec<(u16, u64)>>,
    pub latency: Vec<Histogram>,
    pub rate_limited: u64,
}

impl RequestCounts {
    fn merge(&mut self, o: &RequestCounts) {
        self.grow();
        for (e, statuses) in o.by_status.iter().enumerate() {
            for (s, n) in statuses {
                add_status(&mut self.by_status[e], *s, *n);
            }
        }
        for (e, h) in o.latency.iter().enumerate() {
            self.latency[e].merge(h);
        }
        self.rate_limited += o.rate_limited;
    }

    fn grow(&mut self) {
        if self.by_status.is_empty() {
            self.by_status = vec![Vec::new(); ENDPOINTS.len()];
            self.latency = vec![Histogram::default(); ENDPOINTS.len()];
        }
    }
}

fn add_status(v: &mut Vec<(u16, u64)>, status: u16, n: u64) {
    match v.iter_mut().find(|(s, _)| *s == status) {
        Some((_, c)) => *c += n,
        None => v.push((status, n)),
    }
}

/// A shard's live counters (its own thread only).
#[derive(Default)]
pub struct ShardMetrics {
    counts: RefCell<RequestCounts>,
}

impl ShardMetrics {
    /// One answered request.
    pub fn request(&self, endpoint: usize, status: u16, micros: u64) {
        let mut c = self.counts.borrow_mut();
        c.grow();
        let e = endpoint.min(OTHER);
        add_status(&mut c.by_status[e], status, 1);
        c.latency[e].observe(LATENCY_BUCKETS_US, micros);
    }

    pub fn rate_limited(&self) {
        self.counts.borrow_mut().rate_limited += 1;
    }

    pub fn snapshot(&self) -> RequestCounts {
        self.counts.borrow().clone()
    }
}

/// One tenant as a shard sees it.
#[derive(Debug, Clone)]
pub struct ShardTenant {
    pub id: TenantId,
    pub sse_connections: u64,
    pub delivered: u64,
    pub slow_clients: u64,
}

/// What a shard reports to a scrape.
#[derive(Debug, Clone, Default)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub requests: RequestCounts,
    pub open_connections: u64,
    pub connections_refused: u64,
    pub tracked_addresses: u64,
    /// Requests queued for or waiting on the writer.
    pub writer_in_flight: u64,
    pub tenants: Vec<ShardTenant>,
}

/// One tenant as the writer sees it.
#[derive(Debug, Clone)]
pub struct WriterTenant {
    pub id: TenantId,
    pub name: String,
    pub head: u64,
    pub events_appended: u64,
    pub commits: u64,
    pub commit_failures: u64,
    /// Cluster mode: where this replica stands in the tenant's stream.
    pub log: Option<LogPosition>,
}

/// Cluster mode: a replica's place in its JetStream stream.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogPosition {
    /// The last stream sequence applied.
    pub applied: u64,
    /// The stream's last sequence, as last probed.
    pub stream_last: u64,
}

/// What the writer reports to a scrape.
#[derive(Debug, Clone, Default)]
pub struct WriterSnapshot {
    pub wakeups: u64,
    pub batch_events: Histogram,
    pub commit_micros: Histogram,
    pub busy_retries: u64,
    /// Messages from shards waiting for the writer.
    pub queued_messages: u64,
    pub tenants: Vec<WriterTenant>,
}

/// The process, read from /proc at scrape time.
#[derive(Debug, Clone, Default)]
pub struct ProcessSnapshot {
    pub open_fds: u64,
    pub rss_bytes: u64,
    pub start_time_seconds: f64,
}

impl ProcessSnapshot {
    pub fn read(started: std::time::SystemTime) -> ProcessSnapshot {
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count() as u64)
            .unwrap_or(0);
        // statm: size resident shared … in pages.
        let page = 4096u64;
        let rss_bytes = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|p| p * page)
            .unwrap_or(0);
        ProcessSnapshot {
            open_fds,
            rss_bytes,
            start_time_seconds: started
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        }
    }
}

/// Escape a label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Render everything (or, with `only`, one tenant's series and nothing
/// process-wide) in the Prometheus text exposition format 0.0.4.
///
/// Long: the Prometheus text, one metric family after another, each a few
/// lines of HELP/TYPE and samples; the order is the exposition's.
pub fn render(
    shards: &[ShardSnapshot],
    writer: Option<&WriterSnapshot>,
    process: &ProcessSnapshot,
    only: Option<TenantId>,
) -> String {
    let mut out = String::with_capacity(8192);
    let names: Vec<(TenantId, String)> = writer
        .map(|w| w.tenants.iter().map(|t| (t.id, t.name.clone())).collect())
        .unwrap_or_default();
    let name_of = |id: TenantId| {
        names
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| label(n))
            .unwrap_or_else(|| id.to_string())
    };
    let wanted = |id: TenantId| only.is_none_or(|o| o == id);

    if only.is_none() {
        let mut req = RequestCounts::default();
        for s in shards {
            req.merge(&s.requests);
        }
        req.grow();
        header(
            &mut out,
            "shardcast_http_requests_total",
            "counter",
            "HTTP requests answered, by endpoint and status.",
        );
        for (e, statuses) in req.by_status.iter().enumerate() {
            let mut statuses = statuses.clone();
            statuses.sort();
            for (s, n) in statuses {
                let _ = writeln!(
                    out,
                    "shardcast_http_requests_total{{endpoint=\"{}\",status=\"{s}\"}} {n}",
                    ENDPOINTS[e]
                );
            }
        }
        header(&mut out, "shardcast_http_request_duration_seconds", "histogram", "Time from a request's first byte to its answer being ready to send, by endpoint (subscribe and stream: to their first bytes).");
        for (e, h) in req.latency.iter().enumerate() {
            if h.count() > 0 {
                h.render(
                    &mut out,
                    "shardcast_http_request_duration_seconds",
                    &format!("endpoint=\"{}\"", ENDPOINTS[e]),
                    LATENCY_BUCKETS_US,
                    1e6,
                );
            }
        }
        header(
            &mut out,
            "shardcast_rate_limited_total",
            "counter",
            "Requests refused with 429 by the per-client rate limit.",
        );
        let _ = writeln!(out, "shardcast_rate_limited_total {}", req.rate_limited);
        header(
            &mut out,
            "shardcast_connections_open",
            "gauge",
            "Client connections open, SSE included, by shard.",
        );
        for s in shards {
            let _ = writeln!(
                out,
                "shardcast_connections_open{{shard=\"{}\"}} {}",
                s.shard, s.open_connections
            );
        }
        header(
            &mut out,
            "shardcast_connections_refused_total",
            "counter",
            "Connections refused with 503 at server.max_connections.",
        );
        let refused: u64 = shards.iter().map(|s| s.connections_refused).sum();
        let _ = writeln!(out, "shardcast_connections_refused_total {refused}");
        header(
            &mut out,
            "shardcast_rate_limit_tracked_addresses",
            "gauge",
            "Client addresses the rate limiter holds a bucket for.",
        );
        let tracked: u64 = shards.iter().map(|s| s.tracked_addresses).sum();
        let _ = writeln!(out, "shardcast_rate_limit_tracked_addresses {tracked}");
        header(&mut out, "shardcast_writer_queue_depth", "gauge", "Append requests queued for or waiting on the writer (per shard), and shard messages waiting in its channel.");
        for s in shards {
            let _ = writeln!(
                out,
                "shardcast_writer_queue_depth{{shard=\"{}\"}} {}",
                s.shard, s.writer_in_flight
            );
        }
        if let Some(w) = writer {
            let _ = writeln!(
                out,
                "shardcast_writer_queue_depth{{shard=\"writer_channel\"}} {}",
                w.queued_messages
            );
            header(
                &mut out,
                "shardcast_group_commit_events",
                "histogram",
                "Events made durable per tenant transaction of a group commit.",
            );
            w.batch_events.render(
                &mut out,
                "shardcast_group_commit_events",
                "",
                BATCH_BUCKETS,
                1.0,
            );
            header(
                &mut out,
                "shardcast_group_commit_duration_seconds",
                "histogram",
                "Time of one tenant transaction of a group commit, begin to durable.",
            );
            w.commit_micros.render(
                &mut out,
                "shardcast_group_commit_duration_seconds",
                "",
                LATENCY_BUCKETS_US,
                1e6,
            );
            header(
                &mut out,
                "shardcast_writer_wakeups_total",
                "counter",
                "Group commits (writer wakeups with requests).",
            );
            let _ = writeln!(out, "shardcast_writer_wakeups_total {}", w.wakeups);
            header(
                &mut out,
                "shardcast_sqlite_busy_retries_total",
                "counter",
                "Times the writer waited for a lock held by a checkpoint.",
            );
            let _ = writeln!(
                out,
                "shardcast_sqlite_busy_retries_total {}",
                w.busy_retries
            );
        }
        header(
            &mut out,
            "shardcast_process_open_fds",
            "gauge",
            "Open file descriptors.",
        );
        let _ = writeln!(out, "shardcast_process_open_fds {}", process.open_fds);
        header(
            &mut out,
            "shardcast_process_resident_memory_bytes",
            "gauge",
            "Resident set size.",
        );
        let _ = writeln!(
            out,
            "shardcast_process_resident_memory_bytes {}",
            process.rss_bytes
        );
        header(
            &mut out,
            "shardcast_process_start_time_seconds",
            "gauge",
            "Start time, seconds since the Unix epoch.",
        );
        let _ = writeln!(
            out,
            "shardcast_process_start_time_seconds {}",
            process.start_time_seconds
        );
    }

    if let Some(w) = writer {
        type Series = (
            &'static str,
            &'static str,
            &'static str,
            fn(&WriterTenant) -> u64,
        );
        let series: [Series; 4] = [
            (
                "shardcast_events_appended_total",
                "counter",
                "Events made durable, by tenant.",
                |t| t.events_appended,
            ),
            (
                "shardcast_head_position",
                "gauge",
                "Position of the newest durable event, by tenant.",
                |t| t.head,
            ),
            (
                "shardcast_commits_total",
                "counter",
                "Tenant transactions committed, by tenant.",
                |t| t.commits,
            ),
            (
                "shardcast_commit_failures_total",
                "counter",
                "Tenant transactions that failed (nothing of them written), by tenant.",
                |t| t.commit_failures,
            ),
        ];
        for (name, kind, help, f) in series {
            header(&mut out, name, kind, help);
            for t in w.tenants.iter().filter(|t| wanted(t.id)) {
                let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", label(&t.name), f(t));
            }
        }
        type LogSeries = (&'static str, &'static str, fn(&LogPosition) -> u64);
        let log_series: [LogSeries; 2] = [
            (
                "shardcast_cluster_applied_sequence",
                "Cluster mode: the last JetStream stream sequence this replica applied, by tenant.",
                |l| l.applied,
            ),
            (
                "shardcast_cluster_stream_last_sequence",
                "Cluster mode: the stream's last sequence as last probed (minus applied: this replica's lag in messages), by tenant.",
                |l| l.stream_last,
            ),
        ];
        if w.tenants.iter().any(|t| t.log.is_some()) {
            for (name, help, f) in log_series {
                header(&mut out, name, "gauge", help);
                for t in w.tenants.iter().filter(|t| wanted(t.id)) {
                    if let Some(l) = &t.log {
                        let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", label(&t.name), f(l));
                    }
                }
            }
        }
    }
    // Per tenant, summed over shards, in the writer's tenant order.
    let mut tenant_ids: Vec<TenantId> = names.iter().map(|(i, _)| *i).collect();
    for s in shards {
        for t in &s.tenants {
            if !tenant_ids.contains(&t.id) {
                tenant_ids.push(t.id);
            }
        }
    }
    let sum = |id: TenantId, f: fn(&ShardTenant) -> u64| -> u64 {
        shards
            .iter()
            .flat_map(|s| s.tenants.iter())
            .filter(|t| t.id == id)
            .map(f)
            .sum()
    };
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ShardTenant) -> u64,
    );
    let series: [Series; 3] = [
        ("shardcast_sse_connections", "gauge", "SSE subscribers connected, by tenant.", |t| t.sse_connections),
        ("shardcast_sse_events_delivered_total", "counter", "Events written to SSE subscribers, by tenant.", |t| t.delivered),
        ("shardcast_sse_slow_clients_total", "counter", "SSE subscribers that fell sse.client_buffer_events behind (caught up from SQLite or disconnected per sse.slow_client), by tenant.", |t| t.slow_clients),
    ];
    for (name, kind, help, f) in series {
        header(&mut out, name, kind, help);
        for id in tenant_ids.iter().copied().filter(|i| wanted(*i)) {
            let _ = writeln!(out, "{name}{{tenant=\"{}\"}} {}", name_of(id), sum(id, f));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_in_the_text() {
        let mut h = Histogram::default();
        for v in [50, 150, 150, 2_000_000, 9_000_000] {
            h.observe(LATENCY_BUCKETS_US, v);
        }
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"", LATENCY_BUCKETS_US, 1e6);
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 1\n"), "{out}");
        assert!(
            out.contains("x_bucket{a=\"b\",le=\"0.00025\"} 3\n"),
            "{out}"
        );
        assert!(out.contains("x_bucket{a=\"b\",le=\"5\"} 4\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 5\n"), "{out}");
    }

    #[test]
    fn a_tenant_sees_only_its_own_series() {
        let shard = ShardSnapshot {
            tenants: vec![
                ShardTenant {
                    id: 1,
                    sse_connections: 3,
                    delivered: 9,
                    slow_clients: 0,
                },
                ShardTenant {
                    id: 2,
                    sse_connections: 5,
                    delivered: 1,
                    slow_clients: 1,
                },
            ],
            ..Default::default()
        };
        let writer = WriterSnapshot {
            tenants: vec![
                WriterTenant {
                    id: 1,
                    name: "alice".into(),
                    head: 10,
                    events_appended: 10,
                    commits: 2,
                    commit_failures: 0,
                    log: None,
                },
                WriterTenant {
                    id: 2,
                    name: "bob".into(),
                    head: 4,
                    events_appended: 4,
                    commits: 1,
                    commit_failures: 0,
                    log: None,
                },
            ],
            ..Default::default()
        };
        let all = render(
            std::slice::from_ref(&shard),
            Some(&writer),
            &ProcessSnapshot::default(),
            None,
        );
        assert!(all.contains("shardcast_sse_connections{tenant=\"bob\"} 5"));
        assert!(all.contains("shardcast_process_open_fds"));
        let alice = render(
            &[shard],
            Some(&writer),
            &ProcessSnapshot::default(),
            Some(1),
        );
        assert!(alice.contains("shardcast_head_position{tenant=\"alice\"} 10"));
        assert!(!alice.contains("bob"));
        assert!(!alice.contains("shardcast_process_open_fds"));
    }
}
