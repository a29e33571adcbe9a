//! Listening and accepting. Each shard gets its own socket bound to the same
//! address with SO_REUSEPORT, so the kernel spreads new connections across
//! shards and no accept is ever shared between cores. Sockets are built with
//! socket2 so the backlog is `server.backlog` (glommio's own bind fixes 1024).
//! Each accepted connection is admitted (`shard::admission`) or refused, then
//! served by `connection`.

use crate::shard::Shard;
use socket2::{Domain, Protocol, Socket, Type};
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
        .then(|| glommio::spawn_local(crate::shard::admission::sweep_loop(admission.clone())));
    let mut last_warning: Option<Instant> = None;
    let mut failures_since_warning: u64 = 0;
    loop {
        match listener.accept().await {
            Ok(stream) => match admission.admit() {
                Some(permit) => {
                    glommio::spawn_local(super::connection::serve(shard.clone(), stream, permit))
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
