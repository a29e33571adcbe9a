//! Test harness: start the real `shardcast` binary as a user would (its own
//! process, its own data directory, a free port), and talk HTTP/1.1 to it over
//! real sockets with a deliberately small client, so tests can also send the
//! malformed, pipelined and half-written requests a library client never would.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_shardcast");

/// A scratch directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "shardcast-test-{name}-{}-{}",
            std::process::id(),
            nanos()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    /// Removed, unless the test failed: then its data and logs stay for a
    /// look (the path is printed).
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test data kept in {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// A free port to give a server (`PORT`) when the test must know it before
/// the server says it (a restart on the same port, stdout unreadable).
/// Taken below the kernel's ephemeral range: a port from `bind(:0)` could be
/// handed again, meanwhile, to another test's server (they bind port 0) or
/// to an outgoing connection.
pub fn fixed_port() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768)
        .max(20001);
    let seed = (nanos() as u32) ^ std::process::id();
    (0..5000u32)
        .map(|i| 20000 + seed.wrapping_add(i.wrapping_mul(7919)) % (low - 20000))
        .map(|p| p as u16)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range")
}

/// A `kB` figure from `/proc/<pid>/status` (`VmRSS:`, `RssAnon:`, …).
pub fn proc_status_kib(pid: i32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// A running server process.
pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub dir: PathBuf,
    pub env: Vec<(String, String)>,
    /// Arguments after `serve`.
    pub args: Vec<String>,
    pub stderr_path: PathBuf,
    /// RLIMIT_NOFILE (soft and hard) for the process, when set.
    pub nofile: Option<u64>,
}

impl Server {
    /// Start with data in `dir` and these extra environment variables.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Server {
        Server::start_with_nofile(dir, env, None)
    }

    /// Start with RLIMIT_NOFILE lowered to `nofile` (soft and hard, so the
    /// server cannot raise it back).
    pub fn start_with_nofile(dir: &Path, env: &[(&str, &str)], nofile: Option<u64>) -> Server {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut s = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            env,
            args: Vec::new(),
            stderr_path: dir.join("stderr.log"),
            nofile,
        };
        s.spawn();
        s
    }

    /// `start`, with arguments after `serve` (e.g. `--config FILE`).
    pub fn start_with_args(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Server {
        let mut s = Server {
            child: None,
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: dir.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
            stderr_path: dir.join("stderr.log"),
            nofile: None,
        };
        s.spawn();
        s
    }

    pub fn command(dir: &Path, env: &[(String, String)]) -> Command {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("PORT", "0")
            .env("DB_PATH", dir.join("events.db"))
            .env("SHARDCAST_SERVER_SHUTDOWN_TIMEOUT", "10s")
            // Tests send many requests from one address; tests/it/admission.rs
            // turns the rate limit back on (RATE_LIMIT or SHARDCAST_RATE_LIMIT_*).
            .env("RATE_LIMIT", "0")
            .env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(&mut self) {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .unwrap();
        let mut cmd = Server::command(&self.dir, &self.env);
        cmd.args(&self.args);
        if let Some(n) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start shardcast");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; stderr:\n{}",
                    std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
                );
            }
        };
        self.addr = addr.parse().unwrap();
        self.child = Some(child);
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILL: no chance to flush or finish anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for the exit, failing the test after `within`.
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status;
            }
            if start.elapsed() > within {
                let _ = c.kill();
                panic!("server did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        self.spawn();
    }

    pub fn conn(&self) -> Conn {
        Conn::open(self.addr)
    }

    pub fn get(&self, path: &str) -> Response {
        self.conn().request("GET", path, &[], b"")
    }

    /// GET with `X-API-Key`, expecting 200 with a JSON body.
    pub fn get_with_key(&self, path: &str, key: &str) -> serde_json::Value {
        let r = self.conn().request("GET", path, &[("X-API-Key", key)], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        self.conn().request(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// An error answer must be `{"error":{"code","message"}}`; returns the code.
    pub fn error_code(&self) -> String {
        let v = self.json();
        let code = v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error.code in {v}"));
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "no error.message in {v}"
        );
        assert_eq!(self.header("content-type"), Some("application/json"));
        code.to_string()
    }
}

/// One client connection.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// POST a JSON value with `X-API-Key`; the answer, whatever its status.
    pub fn post_json(&mut self, path: &str, key: &str, body: &serde_json::Value) -> Response {
        self.request(
            "POST",
            path,
            &[("Content-Type", "application/json"), ("X-API-Key", key)],
            body.to_string().as_bytes(),
        )
    }

    pub fn send_raw(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).unwrap();
    }

    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        self.send_raw(&build_request(method, path, headers, body));
        self.read_response().expect("a response")
    }

    /// Read one response; None if the server closed the connection first.
    pub fn read_response(&mut self) -> Option<Response> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(&self.buf) {
                let status = resp.code.unwrap();
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                if status == 100 {
                    self.buf.drain(..n);
                    continue;
                }
                let chunked = headers.iter().any(|(k, v)| {
                    k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
                });
                if chunked {
                    // A streamed answer (a replay, a whole range): de-chunked
                    // as any client would. (Not for answers to HEAD.)
                    self.buf.drain(..n);
                    let mut body = Vec::new();
                    loop {
                        let line_end = loop {
                            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                                break i;
                            }
                            if !self.fill() {
                                return None;
                            }
                        };
                        let size_text = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
                        let size =
                            usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
                        while self.buf.len() < line_end + 2 + size + 2 {
                            if !self.fill() {
                                return None;
                            }
                        }
                        body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                        self.buf.drain(..line_end + 2 + size + 2);
                        if size == 0 {
                            return Some(Response {
                                status,
                                headers,
                                body,
                            });
                        }
                    }
                }
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| v.parse().unwrap())
                    .unwrap_or(0);
                while self.buf.len() < n + len {
                    if !self.fill() {
                        return None;
                    }
                }
                let body = self.buf[n..n + len].to_vec();
                self.buf.drain(..n + len);
                return Some(Response {
                    status,
                    headers,
                    body,
                });
            }
            if !self.fill() {
                return None;
            }
        }
    }

    fn fill(&mut self) -> bool {
        read_into(&mut self.stream, &mut self.buf)
    }

    /// True when the server has closed its side (reads end-of-file).
    pub fn is_closed_by_server(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        let mut tmp = [0u8; 1024];
        let r = match self.stream.read(&mut tmp) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        self.stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        r
    }
}

/// Append what one read returns; false when the peer closed.
fn read_into(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut tmp = [0u8; 65536];
    match stream.read(&mut tmp) {
        Ok(0) => false,
        Ok(n) => {
            buf.extend_from_slice(&tmp[..n]);
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("read: {e}"),
    }
}

pub fn build_request(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (k, v) in headers {
        r.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        r.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    r.push_str("\r\n");
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Read every stored event straight from SQLite: (position, id).
pub fn stored_ids(db: &Path) -> Vec<(u64, String)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut stmt = conn
        .prepare("SELECT position, id FROM events ORDER BY position")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
        })
        .unwrap();
    rows.map(|r| r.unwrap()).collect()
}

/// One SSE message as a client sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseMessage {
    pub id: Option<String>,
    pub event: Option<String>,
    pub data: String,
}

/// A minimal EventSource: sends the GET, checks the head, then parses
/// messages (comments are counted, `retry:` remembered) per the WHATWG rules.
pub struct SseClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub status: u16,
    pub head: String,
    pub comments: usize,
    pub retry: Option<u64>,
    /// The last line ended with CR: an LF first in the next read is part of it.
    after_cr: bool,
    /// A read timing out ends `next` with None instead of failing the test
    /// (for `next_within`).
    timeout_ends: bool,
}

impl SseClient {
    pub fn open(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseClient {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).unwrap();
        let mut c = SseClient {
            stream,
            buf: Vec::new(),
            status: 0,
            head: String::new(),
            comments: 0,
            retry: None,
            after_cr: false,
            timeout_ends: false,
        };
        loop {
            if let Some(end) = c.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                c.head = String::from_utf8_lossy(&c.buf[..end]).into_owned();
                c.status = c.head[9..12].parse().unwrap();
                c.buf.drain(..end + 4);
                break;
            }
            if !c.fill() {
                panic!("closed before a response head");
            }
        }
        c
    }

    fn fill(&mut self) -> bool {
        if self.timeout_ends {
            let mut tmp = [0u8; 65536];
            return match self.stream.read(&mut tmp) {
                Ok(0) => false,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    true
                }
                Err(_) => false,
            };
        }
        read_into(&mut self.stream, &mut self.buf)
    }

    /// The next message if one comes within `wait` (heartbeats do not
    /// count); None if none did, or the stream ended. A message cut by the
    /// timeout is lost: for streams whose messages come in one write.
    pub fn next_within(&mut self, wait: Duration) -> Option<SseMessage> {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        self.timeout_ends = true;
        let m = self.next();
        self.timeout_ends = false;
        m
    }

    /// The body of a non-SSE (error) answer, by its Content-Length.
    pub fn rest(&mut self) -> String {
        let len: usize = self
            .head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())
                    .flatten()
            })
            .unwrap_or(0);
        while self.buf.len() < len && self.fill() {}
        String::from_utf8_lossy(&self.buf).into_owned()
    }

    /// The next line of the stream: it ends at CRLF, a lone LF or a lone CR
    /// (WHATWG HTML §9.2.6), a CRLF possibly split across two reads.
    fn line(&mut self) -> Option<String> {
        loop {
            if self.after_cr && !self.buf.is_empty() {
                if self.buf[0] == b'\n' {
                    self.buf.remove(0);
                }
                self.after_cr = false;
            }
            if let Some(end) = self.buf.iter().position(|c| *c == b'\n' || *c == b'\r') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                self.after_cr = line[end] == b'\r';
                return Some(String::from_utf8(line[..end].to_vec()).unwrap());
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// The next message; None when the server closed the stream.
    pub fn next(&mut self) -> Option<SseMessage> {
        let mut msg = SseMessage::default();
        let mut has_data = false;
        loop {
            let line = self.line()?;
            if line.is_empty() {
                if has_data || msg.id.is_some() || msg.event.is_some() {
                    return Some(msg);
                }
                continue;
            }
            if line.starts_with(':') {
                self.comments += 1;
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => msg.id = Some(value.to_string()),
                "event" => msg.event = Some(value.to_string()),
                "retry" => self.retry = value.parse().ok(),
                "data" => {
                    if has_data {
                        msg.data.push('\n');
                    }
                    msg.data.push_str(value);
                    has_data = true;
                }
                _ => {}
            }
        }
    }

    /// Messages until one with this id (inclusive).
    pub fn until_id(&mut self, id: u64) -> Vec<SseMessage> {
        let mut out = Vec::new();
        while let Some(m) = self.next() {
            let done = m.id.as_deref() == Some(&id.to_string());
            out.push(m);
            if done {
                return out;
            }
        }
        panic!("stream ended before id {id}; got {out:?}");
    }
}
