//! Chunked request bodies (RFC 9112 §7.1), decoded in place as they arrive.
//!
//! Go's `net/http` sends a body of unknown length chunked, and any HTTP/1.1
//! client may. The decoder works on the connection's read buffer: the body
//! area holds the decoded bytes so far, then raw bytes not yet decoded. Each
//! call decodes what has arrived and closes the gap behind it, so the buffer
//! never holds more than the decoded body plus one read, however small the
//! chunks (a client sending one byte per chunk cannot make it hold six).
//! When the last chunk and the trailer section are in, the decoded body sits
//! right after the head and the next pipelined request right after the body,
//! as if the request had come with a `Content-Length`.
//!
//! Chunk extensions and trailer fields are read and ignored (§7.1.1, §7.1.2),
//! each bounded by `LINE_BYTES_MAX`; sizes have at most 16 hex digits.

use super::ApiError;

/// Longest chunk-size line (size plus extensions) or trailer section.
pub const LINE_BYTES_MAX: usize = 4096;
/// Hex digits in a chunk size: 16 fill a u64.
const SIZE_DIGITS_MAX: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a chunk size: `size` so far, `digits` read.
    Size {
        size: u64,
        digits: u32,
    },
    /// After the size: extensions (or whitespace) up to CR.
    Ext {
        size: u64,
    },
    /// CR of the size line read; LF next.
    SizeLf {
        size: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// At the start of a trailer line (or of the final CRLF).
    TrailerStart,
    Trailer,
    TrailerLf,
    /// CR of the final empty line read; LF next.
    LastLf,
    Done,
}

/// One chunked body being decoded.
#[derive(Debug)]
pub struct Dechunk {
    state: State,
    /// Bytes of the body decoded so far (at the start of the body area).
    decoded: usize,
    /// Bytes of the current size line or of the trailer section.
    line: usize,
    /// Largest decoded body accepted.
    max: usize,
}

fn bad(message: &str) -> ApiError {
    ApiError::new(
        400,
        "bad_chunked_body",
        format!("malformed chunked body: {message}"),
    )
    .closing()
}

impl Dechunk {
    pub fn new(max_body_bytes: usize) -> Dechunk {
        Dechunk {
            state: State::Size { size: 0, digits: 0 },
            decoded: 0,
            line: 0,
            max: max_body_bytes,
        }
    }

    /// The decoded body's length so far (the whole body once `advance` said so).
    pub fn decoded(&self) -> usize {
        self.decoded
    }

    /// Decode what has arrived. `body` is the body area: `decoded()` bytes
    /// of body, then raw bytes. Returns how many bytes the area shrank by
    /// (the caller shortens its buffer by that much: everything after the
    /// decoded body moved down) and whether the body is complete.
    pub fn advance(&mut self, body: &mut [u8]) -> Result<(usize, bool), ApiError> {
        let mut r = self.decoded; // next raw byte
        let mut w = self.decoded; // end of the decoded body
        while r < body.len() && self.state != State::Done {
            let c = body[r];
            self.state = match self.state {
                State::Size { size, digits } => {
                    r += 1;
                    self.line += 1;
                    match (c as char).to_digit(16) {
                        Some(v) if digits < SIZE_DIGITS_MAX => State::Size {
                            size: size << 4 | v as u64,
                            digits: digits + 1,
                        },
                        Some(_) => return Err(bad("chunk size over 16 hex digits")),
                        None if digits == 0 => {
                            return Err(bad("a chunk size must start with a hex digit"))
                        }
                        None if c == b'\r' => State::SizeLf { size },
                        None if c == b';' || c == b' ' || c == b'\t' => State::Ext { size },
                        None => return Err(bad("unexpected byte in a chunk size")),
                    }
                }
                State::Ext { size } => {
                    r += 1;
                    self.line += 1;
                    match c {
                        b'\r' => State::SizeLf { size },
                        b'\n' => return Err(bad("bare LF in a chunk extension")),
                        _ => State::Ext { size },
                    }
                }
                State::SizeLf { size } => {
                    r += 1;
                    if c != b'\n' {
                        return Err(bad("CR without LF after a chunk size"));
                    }
                    self.line = 0;
                    if size == 0 {
                        State::TrailerStart
                    } else if size > (self.max - w) as u64 {
                        return Err(ApiError::new(
                            413,
                            "body_too_large",
                            format!("chunked body exceeds {} bytes", self.max),
                        )
                        .closing());
                    } else {
                        State::Data { left: size }
                    }
                }
                State::Data { left } => {
                    let n = (left as usize).min(body.len() - r);
                    body.copy_within(r..r + n, w);
                    r += n;
                    w += n;
                    match left - n as u64 {
                        0 => State::DataCr,
                        left => State::Data { left },
                    }
                }
                State::DataCr => {
                    r += 1;
                    if c != b'\r' {
                        return Err(bad("chunk data longer than its size"));
                    }
                    State::DataLf
                }
                State::DataLf => {
                    r += 1;
                    if c != b'\n' {
                        return Err(bad("CR without LF after chunk data"));
                    }
                    State::Size { size: 0, digits: 0 }
                }
                State::TrailerStart => {
                    r += 1;
                    self.line += 1;
                    if c == b'\r' {
                        State::LastLf
                    } else {
                        State::Trailer
                    }
                }
                State::Trailer => {
                    r += 1;
                    self.line += 1;
                    match c {
                        b'\r' => State::TrailerLf,
                        b'\n' => return Err(bad("bare LF in a trailer field")),
                        _ => State::Trailer,
                    }
                }
                State::TrailerLf => {
                    r += 1;
                    if c != b'\n' {
                        return Err(bad("CR without LF in the trailer section"));
                    }
                    State::TrailerStart
                }
                State::LastLf => {
                    r += 1;
                    if c != b'\n' {
                        return Err(bad("CR without LF at the end"));
                    }
                    State::Done
                }
                State::Done => unreachable!("the loop stops at Done"),
            };
            if self.line > LINE_BYTES_MAX {
                return Err(bad("a chunk-size line or the trailer section is too long"));
            }
        }
        // Close the gap: what follows the raw bytes read moves down behind
        // the decoded body.
        body.copy_within(r.., w);
        debug_assert!(w <= self.max, "decoded beyond the body limit");
        self.decoded = w;
        Ok((r - w, self.state == State::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `raw` arriving in pieces of `step` bytes: the body and what
    /// followed it (the next request), or the error's status.
    fn decode(raw: &[u8], step: usize, max: usize) -> Result<(Vec<u8>, Vec<u8>), u16> {
        let mut d = Dechunk::new(max);
        let mut buf = Vec::new();
        let mut fed = 0;
        for piece in raw.chunks(step.max(1)) {
            buf.extend_from_slice(piece);
            fed += piece.len();
            let (shrank, done) = d.advance(&mut buf).map_err(|e| e.status)?;
            buf.truncate(buf.len() - shrank);
            if done {
                let mut rest = buf.split_off(d.decoded());
                rest.extend_from_slice(&raw[fed..]);
                return Ok((buf, rest));
            }
        }
        Err(0)
    }

    #[test]
    fn decodes_across_any_split() {
        let raw = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nX-T: 1\r\n\r\nGET / HTTP/1.1\r\n";
        for step in 1..raw.len() {
            let (body, rest) = decode(raw, step, 1 << 20).unwrap();
            assert_eq!(body, b"hello 0123456789", "step {step}");
            assert_eq!(rest, b"GET / HTTP/1.1\r\n", "step {step}");
        }
    }

    #[test]
    fn empty_and_upper_case_sizes() {
        assert_eq!(decode(b"0\r\n\r\n", 3, 10).unwrap().0, b"");
        let (body, _) = decode(b"A\r\nabcdefghij\r\n000\r\n\r\n", 4, 10).unwrap();
        assert_eq!(body, b"abcdefghij");
    }

    #[test]
    fn malformed_bodies_are_400() {
        for raw in [
            &b"\r\n"[..],
            b"g\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloX\r\n0\r\n\r\n",
            b"5\r\nhello\rX",
            b"11111111111111111\r\n",
            b"1;a\nb\r\n",
            b"0\r\nX: y\n\r\n",
            b"0\r\n\rX",
        ] {
            assert_eq!(decode(raw, 1, 100).unwrap_err(), 400, "{raw:?}");
        }
        let long_ext = [&b"1;"[..], &vec![b'x'; LINE_BYTES_MAX][..], b"\r\n"].concat();
        assert_eq!(decode(&long_ext, 64, 100).unwrap_err(), 400);
    }

    #[test]
    fn the_limit_is_on_the_decoded_body() {
        assert_eq!(
            decode(b"5\r\nhello\r\n0\r\n\r\n", 2, 5).unwrap().0,
            b"hello"
        );
        assert_eq!(
            decode(b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n", 2, 5).unwrap_err(),
            413
        );
        // Tiny chunks cost no more buffer than the body plus one read.
        let mut raw = Vec::new();
        for _ in 0..1000 {
            raw.extend_from_slice(b"1\r\nx\r\n");
        }
        raw.extend_from_slice(b"0\r\n\r\n");
        let mut d = Dechunk::new(1000);
        let mut buf = Vec::new();
        let mut most = 0;
        for piece in raw.chunks(60) {
            buf.extend_from_slice(piece);
            let (shrank, _) = d.advance(&mut buf).unwrap();
            buf.truncate(buf.len() - shrank);
            most = most.max(buf.len());
        }
        assert_eq!(d.decoded(), 1000);
        assert!(most <= 1000 + 60, "buffer grew to {most}");
    }
}
