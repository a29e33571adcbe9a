//! The body of one shard's executor: build the shard, run its tasks
//! (accepting, the writer's answers, the flusher, the heartbeat, token
//! expiry), obey its control channel until told to stop, then drain.

use crate::config::Config;
use crate::shard::{Control, Shard, ShardInit};
use crate::storage::reader::ReaderHandle;
use crate::tenant::TenantSet;
use crate::writer::{FromWriter, ToWriter};
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Instant;

pub struct ShardParts {
    pub id: usize,
    pub cfg: Arc<Config>,
    pub listener_fd: RawFd,
    pub to_writer: flume::Sender<ToWriter>,
    pub from_writer: flume::Receiver<FromWriter>,
    pub control: flume::Receiver<Control>,
    pub tenants: Arc<TenantSet>,
    pub readers: ReaderHandle,
    pub peers: Vec<flume::Sender<Control>>,
    pub writer_control: flume::Sender<crate::writer::WriterControl>,
    pub started: std::time::SystemTime,
}

/// The body of one shard's executor: accept and serve until told to stop,
/// then drain.
pub async fn run(parts: ShardParts) {
    use std::os::fd::FromRawFd;
    let ShardParts {
        id,
        cfg,
        listener_fd,
        to_writer,
        from_writer,
        control,
        tenants,
        readers,
        peers,
        writer_control,
        started,
    } = parts;
    // SAFETY: the fd is a bound, listening TCP socket made for this shard alone.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(listener_fd) };
    let shard = Shard::new(ShardInit {
        id,
        cfg,
        to_writer,
        tenants,
        readers,
        peers,
        writer_control,
        started,
    });

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
