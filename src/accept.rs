//! Listening and accepting. Each shard gets its own socket bound to the same
//! address with SO_REUSEPORT, so the kernel spreads new connections across
//! shards and no accept is ever shared between cores. Sockets are built with
//! socket2 so the backlog is `server.backlog` (glommio's own bind fixes 1024).
//!
//! Admission happens here too: each shard counts its open connections (SSE
//! included) against its share of `server.max_connections` and answers one
//! beyond it with `503` and `Retry-After` before closing it, without reading
//! its request; and each shard owns its rate limiter (`ratelimit`), which
//! `http` consults per request.

use crate::config::Config;
use crate::http::ApiError;
use crate::ratelimit::Limiter;
use crate::shard::Shard;
use socket2::{Domain, Protocol, Socket, Type};
use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Accept failures are logged at most this often (with how many there were).
const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(1);

/// Bind `count` listening sockets to `addr`. With port 0 the first socket's
/// port is reused for the rest, so all shards share one address.
pub fn bind_listeners(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
) -> io::Result<(SocketAddr, Vec<RawFd>)> {
    if addr.port() != 0 {
        probe_free(addr)?;
    }
    let mut bound = addr;
    let mut fds = Vec::with_capacity(count);
    for _ in 0..count {
        let sock = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        sock.set_reuse_address(true)?;
        sock.set_reuse_port(true)?;
        if bound.is_ipv6() {
            sock.set_only_v6(false).ok();
        }
        sock.bind(&bound.into())?;
        sock.listen(backlog)?;
        if bound.port() == 0 {
            bound = sock
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("listener has no socket address"))?;
        }
        fds.push(sock.into_raw_fd());
    }
    Ok((bound, fds))
}

/// SO_REUSEPORT would let a second server (same user) share the port and
/// silently split the traffic with the first. A socket bound *without* it fails
/// with EADDRINUSE while anyone listens there, so bind one first and refuse.
fn probe_free(addr: SocketAddr) -> io::Result<()> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // SO_REUSEADDR still refuses a port with a listener, but ignores TIME_WAIT
    // leftovers of a previous run.
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(false).ok();
    }
    match sock.bind(&addr.into()) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another process is already on {addr} ({e})"),
        )),
        Err(e) => Err(e),
    }
}

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
    fn admit(self: &Rc<Self>) -> Option<Permit> {
        if self.open.get() >= self.max_open {
            return None;
        }
        self.open.set(self.open.get() + 1);
        Some(Permit(self.clone()))
    }

    /// Answer a connection beyond the cap with 503 and close it, without
    /// reading its request. The answer fits an empty socket buffer, so one
    /// non-blocking send either takes it whole or the peer is gone.
    fn refuse(&self, shard: usize, fd: RawFd) {
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
        self.0.open.set(self.0.open.get() - 1);
    }
}

/// Drop the rate limiter's refilled buckets once a second.
async fn sweep_loop(admission: Rc<Admission>) {
    loop {
        glommio::timer::sleep(crate::ratelimit::SWEEP_INTERVAL).await;
        if let Some(l) = &admission.limiter {
            if l.tracked() > 0 {
                l.sweep();
            }
        }
    }
}

/// Accept connections and serve each on this shard until cancelled.
///
/// Out of file descriptors (EMFILE/ENFILE) the pending connections stay in the
/// kernel's backlog: the loop sleeps 50 ms between attempts (no spinning),
/// warns at most once a second, and resumes as soon as descriptors are free.
pub async fn accept_loop(shard: Rc<Shard>, listener: glommio::net::TcpListener) {
    let admission = shard.admission.clone();
    // Cancelled with this loop: dropping a glommio task cancels it.
    let _sweeper = admission
        .limiter
        .is_some()
        .then(|| glommio::spawn_local(sweep_loop(admission.clone())));
    let mut last_warning: Option<Instant> = None;
    let mut failures_since_warning: u64 = 0;
    loop {
        match listener.accept().await {
            Ok(stream) => match admission.admit() {
                Some(permit) => {
                    glommio::spawn_local(crate::server::connection::serve(
                        shard.clone(),
                        stream,
                        permit,
                    ))
                    .detach();
                }
                None => admission.refuse(shard.id, stream.as_raw_fd()),
            },
            Err(e) => {
                let out_of_fds = matches!(
                    &e,
                    glommio::GlommioError::IoError(io) if matches!(io.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
                );
                failures_since_warning += 1;
                // Warn at most once a second; back off so a full fd table does not spin the loop.
                if last_warning.is_none_or(|t| t.elapsed() > ACCEPT_WARN_INTERVAL) {
                    tracing::warn!(
                        shard = shard.id,
                        error = %e,
                        out_of_fds,
                        open = admission.open(),
                        failures = failures_since_warning,
                        "accept failed"
                    );
                    last_warning = Some(Instant::now());
                    failures_since_warning = 0;
                }
                glommio::timer::sleep(if out_of_fds {
                    crate::limits::ACCEPT_RETRY_AFTER_EMFILE
                } else {
                    crate::limits::ACCEPT_RETRY_AFTER_ERROR
                })
                .await;
            }
        }
    }
}
