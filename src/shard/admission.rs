//! Admission, per shard: each shard counts its open connections (SSE
//! included) against its share of `server.max_connections` and answers one
//! beyond it with `503` and `Retry-After` before closing it, without reading
//! its request; and each shard owns its rate limiter (`ratelimit`), which
//! the connection loop consults per request.

use crate::config::Config;
use crate::http::ApiError;
use crate::ratelimit::Limiter;
use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Instant;

/// One shard's admission state, shared by the shard's connection tasks (one
/// thread: `Cell`/`Rc`, nothing shared with another core).
pub struct Admission {
    /// Connections accepted and not yet closed, SSE subscriptions included.
    open: Cell<usize>,
    /// This shard's share of `server.max_connections`.
    max_open: usize,
    /// The shard's rate limiter; None when `rate_limit.per_second = 0`.
    pub limiter: Option<Limiter>,
    /// The whole answer a connection beyond the cap gets.
    refusal: Vec<u8>,
    refused: Cell<u64>,
    last_refusal_warning: Cell<Option<Instant>>,
}

impl Admission {
    pub fn new(cfg: &Config) -> Admission {
        let max_open = cfg.server.max_connections.div_ceil(cfg.server.shards);
        let mut e = ApiError::new(
            503,
            "too_many_connections",
            format!(
                "this server holds its maximum of {} connections",
                cfg.server.max_connections
            ),
        )
        .closing();
        e.retry_after_secs = Some(cfg.writer.retry_after_secs);
        let mut refusal = Vec::with_capacity(256);
        e.write(&mut refusal, false, None);
        Admission {
            open: Cell::new(0),
            max_open,
            limiter: Limiter::new(&cfg.rate_limit),
            refusal,
            refused: Cell::new(0),
            last_refusal_warning: Cell::new(None),
        }
    }

    /// Connections this shard holds open.
    pub fn open(&self) -> usize {
        self.open.get()
    }

    /// Connections refused at the cap so far.
    pub fn refused(&self) -> u64 {
        self.refused.get()
    }

    /// Count a new connection in, or None when the shard is at its cap.
    pub fn admit(self: &Rc<Self>) -> Option<Permit> {
        if self.open.get() >= self.max_open {
            return None;
        }
        self.open.set(self.open.get() + 1);
        Some(Permit(self.clone()))
    }

    /// Answer a connection beyond the cap with 503 and close it, without
    /// reading its request. The answer fits an empty socket buffer, so one
    /// non-blocking send either takes it whole or the peer is gone.
    pub fn refuse(&self, shard: usize, fd: RawFd) {
        // SAFETY: `fd` is the accepted socket, open until the caller drops its
        // stream; send/recv/shutdown only touch that socket and our buffers.
        unsafe {
            libc::send(
                fd,
                self.refusal.as_ptr().cast(),
                self.refusal.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
            libc::shutdown(fd, libc::SHUT_WR);
            // Closing with unread bytes makes the kernel send RST, which can
            // destroy the 503 before the client reads it: discard what has
            // arrived (without parsing it) so the close is an orderly FIN.
            let mut sink = [0u8; 4096];
            for _ in 0..4 {
                let n = libc::recv(fd, sink.as_mut_ptr().cast(), sink.len(), libc::MSG_DONTWAIT);
                if n <= 0 {
                    break;
                }
            }
        }
        let refused = self.refused.get() + 1;
        self.refused.set(refused);
        if self
            .last_refusal_warning
            .get()
            .is_none_or(|t| t.elapsed() >= crate::log::REPEAT_LOG_INTERVAL)
        {
            self.last_refusal_warning.set(Some(Instant::now()));
            tracing::warn!(
                shard,
                open = self.open.get(),
                max = self.max_open,
                refused_total = refused,
                "connection cap reached: new connections get 503 (server.max_connections)"
            );
        }
    }
}

/// One admitted connection; dropping it (when the connection closes, after
/// its SSE subscription if it became one) frees its place.
pub struct Permit(Rc<Admission>);

impl Permit {
    pub fn admission(&self) -> &Admission {
        &self.0
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // One permit per admitted connection: never below zero.
        debug_assert!(self.0.open.get() > 0, "open connections went negative");
        self.0.open.set(self.0.open.get() - 1);
    }
}

/// Drop the rate limiter's refilled buckets once a second.
pub(crate) async fn sweep_loop(admission: Rc<Admission>) {
    loop {
        glommio::timer::sleep(crate::ratelimit::SWEEP_INTERVAL).await;
        if let Some(l) = &admission.limiter {
            if l.tracked() > 0 {
                l.sweep();
            }
        }
    }
}
