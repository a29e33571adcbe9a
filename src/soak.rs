//! `shardcast bench soak`: a long run against a live server (tooling, not
//! part of the data path; `scripts/soak.sh` starts the server and runs it).
//!
//! It holds N SSE subscribers, half following everything and half one type
//! each, while publisher threads append a mix of single events and batches
//! and read pages back. Every subscriber checks what it receives: an
//! unfiltered one every position exactly once and in order, a filtered one
//! ascending positions of its type only, and at the end as many as were
//! acknowledged of that type. Every `sample` it prints the server's
//! anonymous memory, open descriptors, deliveries and errors; it fails on a
//! lost, repeated or out-of-order position, a dropped subscriber, a failed
//! request, or growth of memory or descriptors beyond the stated bounds.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Event types published (`soak.0` … `soak.9`); filtered subscriber i follows `soak.{i mod TYPES}`.
const TYPES: usize = 10;
/// Events per batch request.
const BATCH_EVENTS: usize = 10;
/// Anonymous memory the server may gain after warm-up: this much plus 10%.
pub const RSS_GROWTH_BYTES_MAX: i64 = 32 << 20;
/// Descriptors the server may gain after warm-up.
pub const FD_GROWTH_MAX: i64 = 16;

#[derive(Debug, Clone)]
pub struct Soak {
    pub addr: SocketAddr,
    pub api_key: Option<String>,
    pub subscribers: usize,
    pub duration: Duration,
    /// Single-event appends per second.
    pub singles_per_sec: f64,
    /// Batch appends (of `BATCH_EVENTS`) per second.
    pub batches_per_sec: f64,
    /// Page reads (`GET /events`) per second.
    pub reads_per_sec: f64,
    pub server_pid: u32,
    pub sample: Duration,
}

/// What the publisher threads count (shared across threads: tooling).
#[derive(Default)]
struct Published {
    per_type: [AtomicU64; TYPES],
    requests: AtomicU64,
    errors: AtomicU64,
    head: AtomicU64,
}

/// What the subscriber tasks count (one executor: cells).
#[derive(Default)]
struct Seen {
    connected: Cell<usize>,
    failed: Cell<usize>,
    dropped: Cell<usize>,
    deliveries: Cell<u64>,
    violations: Cell<u64>,
    /// Per filtered type: deliveries, summed over its subscribers.
    per_type: [Cell<u64>; TYPES],
    filtered_per_type: [Cell<u64>; TYPES],
    unfiltered: Cell<u64>,
}

/// A number from `/proc/<pid>/status` (kB → bytes).
fn status_bytes(pid: u32, field: &str) -> i64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok())
        })
        .map_or(-1, |kb| kb * 1024)
}

fn fds(pid: u32) -> i64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(-1, |d| d.count() as i64)
}

fn request(path: &str, key: Option<&str>, body: Option<&str>) -> Vec<u8> {
    let method = if body.is_some() { "POST" } else { "GET" };
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: soak\r\n");
    if let Some(k) = key {
        r.push_str(&format!("X-API-Key: {k}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        ));
    } else {
        r.push_str("\r\n");
    }
    r.into_bytes()
}

/// Read one answer on a blocking connection: (status, body).
fn answer(c: &mut std::net::TcpStream, buf: &mut Vec<u8>) -> std::io::Result<(u16, Vec<u8>)> {
    let mut tmp = [0u8; 65536];
    loop {
        if let Some(a) = crate::bench::take_answer(buf) {
            return Ok(a);
        }
        let n = c.read(&mut tmp)?;
        if n == 0 {
            return Err(std::io::Error::other("closed"));
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// One publisher thread: `what` requests per second until `stop`.
fn publisher(s: Soak, p: Arc<Published>, stop: Arc<AtomicBool>, what: u8, seed: u64) {
    let rate = match what {
        0 => s.singles_per_sec,
        1 => s.batches_per_sec,
        _ => s.reads_per_sec,
    };
    if rate <= 0.0 {
        return;
    }
    let mut c = match std::net::TcpStream::connect(s.addr) {
        Ok(c) => c,
        Err(_) => {
            p.errors.fetch_add(1, Relaxed);
            return;
        }
    };
    let _ = c.set_nodelay(true);
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buf = Vec::new();
    let start = Instant::now();
    let key = s.api_key.as_deref();
    let mut n: u64 = 0;
    while !stop.load(Relaxed) {
        let due = start + Duration::from_secs_f64(n as f64 / rate);
        if let Some(w) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
        let k = (seed + n) as usize;
        let (req, types): (Vec<u8>, Vec<usize>) = match what {
            0 => {
                let t = k % TYPES;
                let body = format!(r#"{{"type":"soak.{t}","data":{{"n":{n}}}}}"#);
                (request("/events", key, Some(&body)), vec![t])
            }
            1 => {
                let ts: Vec<usize> = (0..BATCH_EVENTS).map(|i| (k + i) % TYPES).collect();
                let evs: Vec<String> = ts
                    .iter()
                    .map(|t| format!(r#"{{"type":"soak.{t}","data":{{"b":{n}}}}}"#))
                    .collect();
                (
                    request("/events/batch", key, Some(&format!("[{}]", evs.join(",")))),
                    ts,
                )
            }
            _ => {
                let from = p.head.load(Relaxed).saturating_sub(100).max(1);
                (
                    request(&format!("/events?from={from}&limit=100"), key, None),
                    vec![],
                )
            }
        };
        n += 1;
        p.requests.fetch_add(1, Relaxed);
        let ok = c.write_all(&req).is_ok()
            && match answer(&mut c, &mut buf) {
                Ok((200, body)) => {
                    if what < 2 {
                        // Count only what was acknowledged.
                        for t in &types {
                            p.per_type[*t].fetch_add(1, Relaxed);
                        }
                        let text = String::from_utf8_lossy(&body);
                        let pos = text
                            .split(['"', ':', ',', '}'])
                            .skip_while(|w| *w != "position" && *w != "last_position")
                            .find_map(|w| w.trim().parse::<u64>().ok())
                            .unwrap_or(0);
                        p.head.fetch_max(pos, Relaxed);
                    }
                    true
                }
                _ => false,
            };
        if !ok {
            p.errors.fetch_add(1, Relaxed);
            return;
        }
    }
}

/// Positions in the complete SSE messages of `buf` (`id: N` lines); returns
/// the bytes consumed.
fn ids(buf: &[u8], out: &mut Vec<u64>) -> usize {
    let Some(end) = buf.windows(2).rposition(|w| w == b"\n\n") else {
        return 0;
    };
    for line in buf[..end].split(|c| *c == b'\n') {
        if let Some(v) = line.strip_prefix(b"id: ") {
            if let Some(n) = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                out.push(n);
            }
        }
    }
    end + 2
}

async fn subscriber(s: Rc<Soak>, seen: Rc<Seen>, i: usize, gate: Rc<Cell<usize>>) {
    while gate.get() >= 256 {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    gate.set(gate.get() + 1);
    let filter = (i % 2 == 1).then_some(i / 2 % TYPES);
    let fail = |seen: &Seen, gate: &Cell<usize>| {
        gate.set(gate.get() - 1);
        seen.failed.set(seen.failed.get() + 1);
    };
    let Ok(mut stream) = glommio::net::TcpStream::connect(s.addr).await else {
        return fail(&seen, &gate);
    };
    let mut path = String::from("/events/subscribe");
    if let Some(t) = filter {
        path.push_str(&format!("?types=soak.{t}"));
        seen.filtered_per_type[t].set(seen.filtered_per_type[t].get() + 1);
    } else {
        seen.unfiltered.set(seen.unfiltered.get() + 1);
    }
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: soak\r\nAccept: text/event-stream\r\n");
    if let Some(k) = &s.api_key {
        req.push_str(&format!("X-API-Key: {k}\r\n"));
    }
    req.push_str("\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        return fail(&seen, &gate);
    }
    let mut buf = vec![0u8; 32 * 1024];
    let mut have = 0;
    loop {
        match stream.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => return fail(&seen, &gate),
            Ok(n) => have += n,
        }
        if let Some(p) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
            if !buf.starts_with(b"HTTP/1.1 200") {
                return fail(&seen, &gate);
            }
            gate.set(gate.get() - 1);
            seen.connected.set(seen.connected.get() + 1);
            buf.copy_within(p + 4..have, 0);
            have -= p + 4;
            break;
        }
        if have == buf.len() {
            return fail(&seen, &gate);
        }
    }
    let mut last: Option<u64> = None;
    let mut got = Vec::new();
    loop {
        got.clear();
        let used = ids(&buf[..have], &mut got);
        buf.copy_within(used..have, 0);
        have -= used;
        for &id in &got {
            let ok = match (last, filter) {
                (None, _) => true,
                (Some(l), None) => id == l + 1,
                (Some(l), Some(_)) => id > l,
            };
            if !ok {
                seen.violations.set(seen.violations.get() + 1);
            }
            last = Some(id);
            seen.deliveries.set(seen.deliveries.get() + 1);
            if let Some(t) = filter {
                seen.per_type[t].set(seen.per_type[t].get() + 1);
            }
        }
        if have == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match stream.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => {
                seen.dropped.set(seen.dropped.get() + 1);
                return;
            }
            Ok(n) => have += n,
        }
    }
}

/// Run the soak; Ok(report lines) when every check held.
pub fn run(s: Soak) -> Result<(), String> {
    let nofile = crate::server::raise_nofile();
    if (nofile as usize) < s.subscribers + 64 {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile}, too low for {} subscribers",
            s.subscribers
        ));
    }
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("soak")
        .io_memory(512 * 1024)
        .spawn(move || async move { drive(Rc::new(s)).await })
        .map_err(|e| e.to_string())?;
    handle.join().map_err(|e| e.to_string())?
}

/// Long: the soak's schedule (connect, publish on a timetable, sample, check
/// every delivery) in one place, as the report reads it.
async fn drive(s: Rc<Soak>) -> Result<(), String> {
    let seen = Rc::new(Seen::default());
    let gate = Rc::new(Cell::new(0usize));
    let tasks: Vec<_> = (0..s.subscribers)
        .map(|i| {
            glommio::spawn_local(subscriber(s.clone(), seen.clone(), i, gate.clone())).detach()
        })
        .collect();
    let t0 = Instant::now();
    while seen.connected.get() + seen.failed.get() < s.subscribers {
        if t0.elapsed() > Duration::from_secs(120) {
            return Err("subscribers did not all connect within 120 s".into());
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    if seen.failed.get() > 0 {
        return Err(format!(
            "{} subscribers could not connect",
            seen.failed.get()
        ));
    }
    glommio::timer::sleep(Duration::from_millis(500)).await;
    let published = Arc::new(Published::default());
    let stop = Arc::new(AtomicBool::new(false));
    // Two single-event publishers, one batch publisher, one reader.
    let threads: Vec<_> = [(0u8, 0u64), (0, 5), (1, 3), (2, 0)]
        .into_iter()
        .map(|(what, seed)| {
            let (s, p, stop) = ((*s).clone(), published.clone(), stop.clone());
            let s = Soak {
                singles_per_sec: s.singles_per_sec / 2.0,
                ..s
            };
            std::thread::spawn(move || publisher(s, p, stop, what, seed))
        })
        .collect();
    let pid = s.server_pid;
    let start = Instant::now();
    let mut baseline: Option<(i64, i64)> = None;
    let mut worst_rss = 0i64;
    let mut worst_fds = 0i64;
    loop {
        glommio::timer::sleep(s.sample).await;
        let (rss, fd) = (status_bytes(pid, "RssAnon:"), fds(pid));
        let t = start.elapsed().as_secs();
        crate::say!(
            "SAMPLE t={t} rss_anon_bytes={rss} fds={fd} subscribers={} deliveries={} published_requests={} errors={} violations={} dropped={}",
            seen.connected.get() - seen.dropped.get(),
            seen.deliveries.get(),
            published.requests.load(Relaxed),
            published.errors.load(Relaxed),
            seen.violations.get(),
            seen.dropped.get(),
        );
        // The first sample is the warm-up: growth is measured from it.
        let (r0, f0) = *baseline.get_or_insert((rss, fd));
        worst_rss = worst_rss.max(rss - r0);
        worst_fds = worst_fds.max(fd - f0);
        let failing = published.errors.load(Relaxed) > 0
            || seen.violations.get() > 0
            || seen.dropped.get() > 0
            || rss < 0;
        if failing || start.elapsed() >= s.duration {
            break;
        }
    }
    stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    // Drain: every acknowledged event to every subscriber that follows it.
    let total: u64 = published.per_type.iter().map(|c| c.load(Relaxed)).sum();
    let expected = |seen: &Seen| -> u64 {
        seen.unfiltered.get() * total
            + (0..TYPES)
                .map(|t| seen.filtered_per_type[t].get() * published.per_type[t].load(Relaxed))
                .sum::<u64>()
    };
    let until = Instant::now() + Duration::from_secs(60);
    while seen.deliveries.get() < expected(&seen) && Instant::now() < until {
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    let (r0, _) = baseline.unwrap_or((0, 0));
    let rss_bound = RSS_GROWTH_BYTES_MAX + r0 / 10;
    let mut failures = Vec::new();
    if published.errors.load(Relaxed) > 0 {
        failures.push(format!(
            "{} requests failed",
            published.errors.load(Relaxed)
        ));
    }
    if seen.violations.get() > 0 {
        failures.push(format!(
            "{} positions lost, repeated or out of order",
            seen.violations.get()
        ));
    }
    if seen.dropped.get() > 0 {
        failures.push(format!("{} subscribers dropped", seen.dropped.get()));
    }
    if seen.deliveries.get() != expected(&seen) {
        failures.push(format!(
            "{} deliveries, {} expected",
            seen.deliveries.get(),
            expected(&seen)
        ));
    }
    for t in 0..TYPES {
        let want = seen.filtered_per_type[t].get() * published.per_type[t].load(Relaxed);
        if seen.per_type[t].get() != want {
            failures.push(format!(
                "type soak.{t}: {} deliveries, {want} expected",
                seen.per_type[t].get()
            ));
        }
    }
    if worst_rss > rss_bound {
        failures.push(format!(
            "server anonymous memory grew {worst_rss} bytes (bound {rss_bound})"
        ));
    }
    if worst_fds > FD_GROWTH_MAX {
        failures.push(format!(
            "server descriptors grew by {worst_fds} (bound {FD_GROWTH_MAX})"
        ));
    }
    crate::say!(
        "RESULT seconds={} subscribers={} events={total} requests={} deliveries={} expected={} rss_growth_bytes={worst_rss} rss_bound_bytes={rss_bound} fd_growth={worst_fds} errors={} violations={} dropped={} {}",
        start.elapsed().as_secs(),
        seen.connected.get(),
        published.requests.load(Relaxed),
        seen.deliveries.get(),
        expected(&seen),
        published.errors.load(Relaxed),
        seen.violations.get(),
        seen.dropped.get(),
        if failures.is_empty() { "PASS" } else { "FAIL" }
    );
    drop(tasks);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}
