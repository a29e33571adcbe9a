//! Answers as values: `Response` (status, content type, headers, body) and
//! `ApiError` (the JSON error every refusal is), written by the connection
//! loop once, with CORS and `Connection` added there.

/// An error answer. `close` ends the connection after it is written.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub allow: Option<&'static str>,
    pub retry_after_secs: Option<u32>,
    pub close: bool,
    /// Extra members of the `error` object (already JSON-encoded `"k":v` pairs).
    pub extra_json: Option<String>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            allow: None,
            retry_after_secs: None,
            close: false,
            extra_json: None,
        }
    }
    pub fn closing(mut self) -> ApiError {
        self.close = true;
        self
    }
    /// The answer this error is: a JSON body, its status and headers.
    pub fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(64 + self.message.len());
        body.extend_from_slice(b"{\"error\":{\"code\":");
        crate::event::push_json_str(&mut body, self.code);
        body.extend_from_slice(b",\"message\":");
        crate::event::push_json_str(&mut body, &self.message);
        if let Some(extra) = &self.extra_json {
            body.push(b',');
            body.extend_from_slice(extra.as_bytes());
        }
        body.extend_from_slice(b"}}");
        let mut r = Response::json(self.status, body);
        if let Some(a) = self.allow {
            r.headers.push(("Allow", a.to_string()));
        }
        if let Some(s) = self.retry_after_secs {
            r.headers.push(("Retry-After", s.to_string()));
        }
        if self.status == 401 {
            r.headers.push(("WWW-Authenticate", "Bearer".to_string()));
        }
        r.close = self.close;
        r
    }

    /// Append this error's whole answer to `out`.
    pub fn write(self, out: &mut Vec<u8>, keep_alive: bool, cors: Option<&str>) {
        self.into_response().write(out, keep_alive, false, cors);
    }
}

/// An answer's body.
pub enum Body {
    Empty,
    Static(&'static [u8]),
    Bytes(Vec<u8>),
    /// A read's answer (JSON array parts joined as they are written).
    Read(Answer),
}

impl Body {
    fn len(&self) -> usize {
        match self {
            Body::Empty => 0,
            Body::Static(b) => b.len(),
            Body::Bytes(b) => b.len(),
            Body::Read(a) => a.len(),
        }
    }
}

/// An answer as a value: handlers return it, the connection loop writes it
/// once (with the CORS lines and `Connection: close` it decides), and reads
/// its status from here, never back from written bytes.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Body,
    /// The connection ends after this answer.
    pub close: bool,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Body) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
            close: false,
        }
    }

    pub fn json(status: u16, body: Vec<u8>) -> Response {
        Response::new(status, JSON, Body::Bytes(body))
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Append the whole answer to `out`: status line, headers (the CORS
    /// `lines` among them), and the body unless it answers a HEAD request.
    pub fn write(&self, out: &mut Vec<u8>, keep_alive: bool, is_head: bool, cors: Option<&str>) {
        write_head(
            out,
            self.status,
            self.content_type,
            &self.headers,
            cors,
            self.body.len(),
            keep_alive && !self.close,
        );
        if is_head {
            return;
        }
        match &self.body {
            Body::Empty => {}
            Body::Static(b) => out.extend_from_slice(b),
            Body::Bytes(b) => out.extend_from_slice(b),
            Body::Read(a) => a.write_to(out),
        }
    }
}

pub const JSON: &str = "application/json";

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        507 => "Insufficient Storage",
        _ => "Unknown",
    }
}

/// The status line and headers of an answer whose body (of `body_len`
/// bytes) the caller appends. `cors` holds whole header lines (each ending
/// in CRLF).
pub fn write_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    extra: &[(&str, String)],
    cors: Option<&str>,
    body_len: usize,
    keep_alive: bool,
) {
    let mut n = itoa::Buffer::new();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(n.format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: shardcast\r\n");
    // A 204 has no body, and says nothing about one (RFC 9110 §8.6).
    if status != 204 {
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(content_type.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(n.format(body_len).as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (k, v) in extra {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(lines) = cors {
        out.extend_from_slice(lines.as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// A read's answer body: JSON arrays (the parts of a page read in parallel)
/// that go out as one array, so the parts are copied once, into the
/// response, rather than joined first; or a single (possibly gzipped) body.
pub struct Answer {
    pub parts: Vec<Vec<u8>>,
    pub gzipped: bool,
    /// The page stopped at its limit before the range's end: the next page
    /// starts here (answered as `X-Next-From`, so no client is silently short).
    pub next_from: Option<u64>,
}

impl Answer {
    pub(crate) fn one(body: Vec<u8>, gzipped: bool) -> Answer {
        Answer {
            parts: vec![body],
            gzipped,
            next_from: None,
        }
    }

    /// Where the next page starts, if this one (`count` events, the last at
    /// `last`) was cut by `limit` before `end`.
    pub(crate) fn cut(mut self, count: usize, last: Option<u64>, limit: usize, end: u64) -> Answer {
        self.next_from = last.filter(|l| count >= limit && *l < end).map(|l| l + 1);
        self
    }

    /// Bytes `write_to` appends.
    pub fn len(&self) -> usize {
        match self.parts.as_slice() {
            [one] => one.len(),
            parts => {
                2 + parts.len().saturating_sub(1) + parts.iter().map(|p| p.len() - 2).sum::<usize>()
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append the body: a single part as it is; several JSON arrays as one
    /// (each is `[…]` and, by `page_json`'s check, non-empty).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match self.parts.as_slice() {
            [one] => out.extend_from_slice(one),
            parts => {
                out.push(b'[');
                for (i, p) in parts.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(&p[1..p.len() - 1]);
                }
                out.push(b']');
            }
        }
    }
}
