//! Listening and accepting. Each shard gets its own socket bound to the same
//! address with SO_REUSEPORT, so the kernel spreads new connections across
//! shards and no accept is ever shared between cores. Sockets are built with
//! socket2 so the backlog is `server.backlog` (glommio's own bind fixes 1024).

use crate::shard::Shard;
use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{IntoRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

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
pub async fn accept_loop(shard: Rc<Shard>, listener: glommio::net::TcpListener) {
    let mut last_warning: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(crate::http::serve(shard.clone(), stream)).detach();
            }
            Err(e) => {
                let out_of_fds = matches!(
                    &e,
                    glommio::GlommioError::IoError(io) if matches!(io.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
                );
                // Warn at most once a second; back off so a full fd table does not spin the loop.
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                    tracing::warn!(shard = shard.id, error = %e, out_of_fds, "accept failed");
                    last_warning = Some(Instant::now());
                }
                glommio::timer::sleep(Duration::from_millis(if out_of_fds { 50 } else { 5 })).await;
            }
        }
    }
}
