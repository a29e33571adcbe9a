//! `shardcast bench sse`: the SSE load tool (tooling, not part of the data
//! path). From one process it opens N subscriber connections (raising its
//! RLIMIT_NOFILE soft limit to the hard one), measures the server's RSS per
//! idle connection, publishes M events at a rate, and reports connections
//! held, delivery ratio, deliveries/s and publish→deliver latency.
//!
//! It speaks to shardcast (`POST /events`, `GET /events/subscribe`) or to
//! nginx's nchan module (`POST` to a publisher location, `GET` an EventSource
//! subscriber location), so `scripts/bench-sse.sh` can run both under the same
//! load in the same run. Every event carries its publish time (`"t":` Unix
//! nanoseconds) and latency is measured on this machine's clock when the
//! subscriber reads it.

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use std::cell::{Cell, RefCell};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Shardcast,
    Nchan,
}

#[derive(Debug, Clone)]
pub struct SseBench {
    pub target: Target,
    /// host:port of the server.
    pub addr: SocketAddr,
    /// Where events are published, when not `addr` (cluster mode: append on
    /// other nodes, measure delivery on this one); publisher k uses the
    /// (k mod len)-th.
    pub publish_addrs: Vec<SocketAddr>,
    /// Subscribe path (shardcast: `/events/subscribe`; nchan: its sub location).
    pub sub_path: String,
    /// Publish path (shardcast: `/events`; nchan: its pub location).
    pub pub_path: String,
    pub api_key: Option<String>,
    pub connections: usize,
    pub events: usize,
    /// Events per second; 0 publishes as fast as the server answers.
    pub rate: f64,
    /// The server's pid, for RSS per connection (optional).
    pub server_pid: Option<u32>,
    /// Connections opened at once while connecting.
    pub connect_parallel: usize,
    /// How long to wait for stragglers after the last publish.
    pub drain: Duration,
    /// Publishing connections, each pipelining its share of the events.
    pub publishers: usize,
    /// Topics: subscriber i follows type (channel) `t{i mod types}` and event
    /// n has type `t{n mod types}`; 0 = every subscriber gets every event.
    pub types: usize,
    /// One event in flight per publisher: wait for each answer before the
    /// next request (else requests are pipelined on schedule).
    pub serial: bool,
    /// Subscribe with a subscription token each (user `bench-{i}`, scoped
    /// to subscriber i's topic, or everything), signed with this secret;
    /// the API key then only publishes.
    pub token_secret: Option<String>,
}

impl SseBench {
    /// The subscribe path of subscriber `i`.
    fn sub_path_of(&self, i: usize) -> String {
        if let (Some(secret), Target::Shardcast) = (&self.token_secret, self.target) {
            // The token's scope is the filter: no `types=` beside it.
            let types = match self.types {
                0 => "*".to_string(),
                k => format!("t{}", i % k),
            };
            let m = crate::token::Mint {
                sub: format!("bench-{i}"),
                types: vec![types],
                streams: Vec::new(),
                ttl_secs: 24 * 3600,
                tenant: None,
            };
            let token = crate::token::signing_key(Some(secret), None)
                .and_then(|(key, alg)| crate::token::mint(&m, &key, alg, crate::token::now_secs()))
                .unwrap_or_default();
            return format!("{}?token={token}", self.sub_path);
        }
        match (self.types, self.target) {
            (0, _) => self.sub_path.clone(),
            (k, Target::Shardcast) => format!("{}?types=t{}", self.sub_path, i % k),
            (k, Target::Nchan) => format!("{}/t{}", self.sub_path, i % k),
        }
    }

    /// Subscribers (of `held`) that follow event `n`.
    fn followers(&self, held: usize, n: usize) -> u64 {
        match self.types {
            0 => held as u64,
            k => (held / k + usize::from(n % k < held % k)) as u64,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct SseReport {
    pub connections_held: usize,
    pub deliveries: u64,
    pub expected: u64,
    pub delivery_ratio: f64,
    pub deliveries_per_sec: f64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub rss_per_idle_conn_bytes: Option<i64>,
    pub publish_secs: f64,
    /// Events acknowledged per second of publishing.
    pub events_per_sec: f64,
    /// Server CPU time (user + system) from the first publish to the last
    /// delivery, per delivery.
    pub cpu_ns_per_delivery: Option<u64>,
}

impl SseReport {
    pub fn line(&self) -> String {
        format!(
            "RESULT connections={} deliveries={} expected={} delivery_ratio={:.4} deliveries_s={:.0} p50_us={} p99_us={} rss_per_conn_bytes={} publish_s={:.2} events_s={:.0} cpu_ns_per_delivery={}",
            self.connections_held,
            self.deliveries,
            self.expected,
            self.delivery_ratio,
            self.deliveries_per_sec,
            self.p50_us,
            self.p99_us,
            self.rss_per_idle_conn_bytes
                .map(|b| b.to_string())
                .unwrap_or_else(|| "?".into()),
            self.publish_secs,
            self.events_per_sec,
            self.cpu_ns_per_delivery
                .map(|b| b.to_string())
                .unwrap_or_else(|| "?".into()),
        )
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used, in nanoseconds.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) in parentheses.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(ticks * 1_000_000_000 / hz)
}

/// Resident set size of a process, in bytes.
pub fn rss_bytes(pid: u32) -> Option<i64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: i64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// What the subscriber tasks share (one executor: plain cells).
#[derive(Default)]
struct Tally {
    connected: Cell<usize>,
    failed: Cell<usize>,
    deliveries: Cell<u64>,
    last_delivery: Cell<Option<Instant>>,
    latencies_us: RefCell<Vec<u32>>,
}

/// Count the `"t":<nanos>` stamps in complete lines of `buf`, recording
/// latencies; returns how many bytes were consumed.
fn scan(buf: &[u8], tally: &Tally) -> usize {
    let Some(end) = buf.iter().rposition(|c| *c == b'\n') else {
        return 0;
    };
    let now = now_nanos();
    let mut i = 0;
    let hay = &buf[..end];
    while let Some(off) = find(&hay[i..], b"\"t\":") {
        let mut j = i + off + 4;
        let mut t: u64 = 0;
        while j < hay.len() && hay[j].is_ascii_digit() {
            t = t * 10 + (hay[j] - b'0') as u64;
            j += 1;
        }
        tally.deliveries.set(tally.deliveries.get() + 1);
        let lat = now.saturating_sub(t) / 1000;
        let mut l = tally.latencies_us.borrow_mut();
        // Bounded sample: every delivery counts, at most 2M latencies kept.
        if l.len() < 2_000_000 {
            l.push(lat.min(u32::MAX as u64) as u32);
        }
        i = j;
    }
    tally.last_delivery.set(Some(Instant::now()));
    end + 1
}

/// Take one whole HTTP answer (by `Content-Length`) off the front of
/// `buf`: its status and body; None until it has all arrived.
pub(crate) fn take_answer(buf: &mut Vec<u8>) -> Option<(u16, Vec<u8>)> {
    let p = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    if buf.len() < p + 4 + len {
        return None;
    }
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = buf[p + 4..p + 4 + len].to_vec();
    buf.drain(..p + 4 + len);
    Some((status, body))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn subscriber(b: Rc<SseBench>, tally: Rc<Tally>, gate: Rc<Cell<usize>>, i: usize) {
    // Ramp: at most `connect_parallel` handshakes in flight.
    while gate.get() >= b.connect_parallel {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    gate.set(gate.get() + 1);
    let stream = glommio::net::TcpStream::connect(b.addr).await;
    let mut stream = match stream {
        Ok(s) => s,
        Err(_) => {
            gate.set(gate.get() - 1);
            tally.failed.set(tally.failed.get() + 1);
            return;
        }
    };
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n",
        b.sub_path_of(i)
    );
    if let (Some(k), None) = (&b.api_key, &b.token_secret) {
        req.push_str(&format!("X-API-Key: {k}\r\n"));
    }
    req.push_str("\r\n");
    if stream.write_all(req.as_bytes()).await.is_err() {
        gate.set(gate.get() - 1);
        tally.failed.set(tally.failed.get() + 1);
        return;
    }
    let mut buf = vec![0u8; 16 * 1024];
    let mut have = 0;
    // The head.
    loop {
        match stream.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => {
                gate.set(gate.get() - 1);
                tally.failed.set(tally.failed.get() + 1);
                return;
            }
            Ok(n) => have += n,
        }
        if let Some(p) = find(&buf[..have], b"\r\n\r\n") {
            let ok = buf.starts_with(b"HTTP/1.1 200");
            gate.set(gate.get() - 1);
            if !ok {
                tally.failed.set(tally.failed.get() + 1);
                return;
            }
            tally.connected.set(tally.connected.get() + 1);
            buf.copy_within(p + 4..have, 0);
            have -= p + 4;
            break;
        }
        if have == buf.len() {
            gate.set(gate.get() - 1);
            tally.failed.set(tally.failed.get() + 1);
            return;
        }
    }
    // The stream.
    loop {
        let used = scan(&buf[..have], &tally);
        buf.copy_within(used..have, 0);
        have -= used;
        if have == buf.len() {
            have = 0; // a line longer than the buffer: not ours
        }
        match stream.read(&mut buf[have..]).await {
            Ok(0) | Err(_) => {
                tally.connected.set(tally.connected.get() - 1);
                return;
            }
            Ok(n) => have += n,
        }
    }
}

/// Publish `events` events at `rate` over one keep-alive connection,
/// pipelined: requests go out on schedule while a second thread reads the
/// answers, so a slow answer does not slow the publishing. Returns when the
/// first and the last publish were sent, once every answer arrived.
fn publish(b: &SseBench) -> std::io::Result<(Instant, Instant)> {
    let start = Instant::now();
    let publishers: Vec<_> = (0..b.publishers.max(1))
        .map(|k| {
            let b = b.clone();
            std::thread::spawn(move || publish_on_one_connection(&b, k, start))
        })
        .collect();
    let mut last = start;
    for p in publishers {
        let (_, l) = p
            .join()
            .map_err(|_| std::io::Error::other("publisher panicked"))??;
        last = last.max(l);
    }
    Ok((start, last))
}

/// Publisher `k` of `b.publishers`: events k, k + P, k + 2P, … on their
/// schedule. Returns when it started and when its last answer arrived.
fn publish_on_one_connection(
    b: &SseBench,
    k: usize,
    start: Instant,
) -> std::io::Result<(Instant, Instant)> {
    let p = b.publishers.max(1);
    let to = match b.publish_addrs.len() {
        0 => b.addr,
        n => b.publish_addrs[k % n],
    };
    let mut conn = std::net::TcpStream::connect(to)?;
    conn.set_nodelay(true)?;
    let mut answers = conn.try_clone()?;
    answers.set_read_timeout(Some(Duration::from_secs(60)))?;
    let expected = (b.events + p - 1 - k) / p;
    // Serial: each answer lets the next request go.
    let (answered, next) = std::sync::mpsc::channel::<()>();
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
        let mut tmp = vec![0u8; 64 * 1024];
        let mut seen = 0;
        while seen < expected {
            // Take every complete answer buffered.
            while let Some((status, body)) = take_answer(&mut buf) {
                if !(200..300).contains(&status) {
                    let body = String::from_utf8_lossy(&body);
                    return Err(std::io::Error::other(format!(
                        "publish answered {status}: {body}"
                    )));
                }
                seen += 1;
                let _ = answered.send(());
            }
            if seen >= expected {
                break;
            }
            let n = answers.read(&mut tmp)?;
            if n == 0 {
                return Err(std::io::Error::other("publisher connection closed"));
            }
            buf.extend_from_slice(&tmp[..n]);
        }
        Ok(())
    });
    let mut out = Vec::with_capacity(64 * 1024);
    for i in (k..b.events).step_by(p) {
        if b.rate > 0.0 {
            let due = start + Duration::from_secs_f64(i as f64 / b.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let stamp = format!("{{\"t\":{},\"n\":{}}}", now_nanos(), i);
        let topic = match b.types {
            0 => "bench".to_string(),
            k => format!("t{}", i % k),
        };
        let (body, path) = match b.target {
            Target::Shardcast => (
                format!("{{\"type\":\"{topic}\",\"data\":{stamp}}}"),
                b.pub_path.clone(),
            ),
            Target::Nchan if b.types == 0 => (stamp, b.pub_path.clone()),
            Target::Nchan => (stamp, format!("{}/{topic}", b.pub_path)),
        };
        out.clear();
        out.extend_from_slice(
            format!(
                "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
        if let Some(k) = &b.api_key {
            out.extend_from_slice(format!("X-API-Key: {k}\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
        conn.write_all(&out)?;
        if b.serial && next.recv().is_err() {
            break; // the reader ended: its error is returned below
        }
    }
    reader
        .join()
        .map_err(|_| std::io::Error::other("answer reader panicked"))??;
    // When the last answer arrived: events/s counts what was accepted, not
    // what was sent.
    Ok((start, Instant::now()))
}

fn percentile(sorted: &[u32], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)] as u64
}

/// Run the benchmark: connect, measure idle RSS, publish, wait, report.
pub fn run_sse(b: SseBench) -> Result<SseReport, String> {
    let nofile = crate::server::raise_nofile();
    if (nofile as usize) < b.connections + 64 {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile}, too low for {} connections",
            b.connections
        ));
    }
    let b = Rc::new(b);
    let handle = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("bench-sse")
        .io_memory(512 * 1024)
        .spawn({
            let b = (*b).clone();
            move || async move { drive(Rc::new(b)).await }
        })
        .map_err(|e| e.to_string())?;
    handle.join().map_err(|e| e.to_string())?
}

async fn drive(b: Rc<SseBench>) -> Result<SseReport, String> {
    let tally = Rc::new(Tally::default());
    let gate = Rc::new(Cell::new(0usize));
    let rss0 = b.server_pid.and_then(rss_bytes);
    let mut tasks = Vec::with_capacity(b.connections);
    for i in 0..b.connections {
        tasks.push(
            glommio::spawn_local(subscriber(b.clone(), tally.clone(), gate.clone(), i)).detach(),
        );
    }
    // Wait for every connection to be answered (or to fail).
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.connected.get() + tally.failed.get() < b.connections {
        if Instant::now() > deadline {
            break;
        }
        glommio::timer::sleep(Duration::from_millis(20)).await;
    }
    // Let the server settle, then measure its memory with every connection idle.
    glommio::timer::sleep(Duration::from_millis(500)).await;
    let held = tally.connected.get();
    let rss1 = b.server_pid.and_then(rss_bytes);
    let rss_per = match (rss0, rss1) {
        (Some(a), Some(c)) if held > 0 => Some((c - a) / held as i64),
        _ => None,
    };
    // Publish from a plain thread (blocking I/O must stay off this executor).
    let cpu0 = b.server_pid.and_then(cpu_ns);
    let pb = (*b).clone();
    let publisher = std::thread::spawn(move || publish(&pb));
    while !publisher.is_finished() {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let (first, last) = publisher
        .join()
        .map_err(|_| "publisher panicked".to_string())?
        .map_err(|e| format!("publishing failed: {e}"))?;
    let expected: u64 = (0..b.events).map(|n| b.followers(held, n)).sum();
    let until = Instant::now() + b.drain;
    while tally.deliveries.get() < expected && Instant::now() < until {
        glommio::timer::sleep(Duration::from_millis(5)).await;
    }
    let deliveries = tally.deliveries.get();
    let cpu = match (cpu0, b.server_pid.and_then(cpu_ns)) {
        (Some(a), Some(c)) if deliveries > 0 => Some((c - a) / deliveries),
        _ => None,
    };
    let span = tally
        .last_delivery
        .get()
        .map(|t| t.duration_since(first).as_secs_f64())
        .unwrap_or(0.0)
        .max(1e-9);
    let mut lat = std::mem::take(&mut *tally.latencies_us.borrow_mut());
    lat.sort_unstable();
    drop(tasks);
    Ok(SseReport {
        connections_held: held,
        deliveries,
        expected,
        delivery_ratio: if expected > 0 {
            deliveries as f64 / expected as f64
        } else {
            0.0
        },
        deliveries_per_sec: deliveries as f64 / span,
        p50_us: percentile(&lat, 0.50),
        p99_us: percentile(&lat, 0.99),
        rss_per_idle_conn_bytes: rss_per,
        publish_secs: last.duration_since(first).as_secs_f64(),
        events_per_sec: b.events as f64 / last.duration_since(first).as_secs_f64().max(1e-9),
        cpu_ns_per_delivery: cpu,
    })
}
