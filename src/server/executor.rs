//! The body of one shard's executor: build the shard, run its tasks
//! (accepting, the writer's answers, the flusher, the heartbeat, token
//! expiry), obey its control channel until told to stop, then drain.

use crate::shard::{Control, Shard, ShardInit};
use crate::writer::FromWriter;
use std::os::fd::RawFd;
use std::time::Instant;

/// What a shard's executor starts from: the shard's own parts, its
/// listening socket, and its two inboxes.
pub struct ShardParts {
    pub shard: ShardInit,
    pub listener_fd: RawFd,
    pub from_writer: flume::Receiver<FromWriter>,
    pub control: flume::Receiver<Control>,
}

/// The body of one shard's executor: accept and serve until told to stop,
/// then drain.
pub async fn run(parts: ShardParts) {
    use std::os::fd::FromRawFd;
    let ShardParts {
        shard,
        listener_fd,
        from_writer,
        control,
    } = parts;
    let id = shard.id;
    // SAFETY: the fd is a bound, listening TCP socket made for this shard alone.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener_fd) };
    let shard = Shard::new(shard);

    let replies = {
        let shard = shard.clone();
        glommio::spawn_local(async move {
            while let Ok(msg) = from_writer.recv_async().await {
                shard.committed(msg);
            }
        })
    };
    let flusher = {
        let shard = shard.clone();
        glommio::spawn_local(async move { shard.writer.run_flusher().await })
    };
    let acceptor = {
        let shard = shard.clone();
        glommio::spawn_local(async move { super::accept::accept_loop(shard, listener).await })
    };
    let heartbeat = glommio::spawn_local(crate::shard::fanout::heartbeat_loop(shard.clone()));
    let expiry = glommio::spawn_local(crate::shard::fanout::expiry_loop(shard.clone()));
    tracing::debug!(shard = id, "shard started");

    let deadline = loop {
        match control.recv_async().await {
            Ok(msg) => {
                if let Some(deadline) = shard.on_control(msg) {
                    break deadline;
                }
            }
            Err(_) => break Instant::now() + shard.cfg.server.shutdown_timeout,
        }
    };
    // Stop accepting: dropping the task drops the listener and closes its socket.
    let _ = acceptor.cancel().await;
    shard.drain(deadline).await;
    let _ = heartbeat.cancel().await;
    let _ = expiry.cancel().await;
    let _ = flusher.cancel().await;
    shard.writer.close();
    let _ = replies.cancel().await;
    tracing::debug!(shard = id, "shard stopped");
}
