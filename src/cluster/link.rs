//! The node's link to NATS: the connection (credentials, TLS, reconnecting
//! for ever), each tenant's stream (created with `cluster.replicas` if
//! absent, checked if present), and the probe that keeps `health` current.

use super::{stream_name, subject, Ctx};
use crate::config::ClusterConfig;
use crate::limits::LOG_PROBE_INTERVAL;
use async_nats::jetstream::stream;
use std::rc::Rc;
use std::time::Duration;

/// The options every connection of this node uses: its name, credentials
/// and TLS.
async fn options(cfg: &ClusterConfig) -> Result<async_nats::ConnectOptions, String> {
    let mut opts = async_nats::ConnectOptions::new()
        .name(format!("shardcast {}", cfg.node_name))
        .connection_timeout(Duration::from_secs(2))
        .require_tls(cfg.nats_tls_required);
    if let Some(token) = &cfg.nats_token {
        opts = opts.token(token.clone());
    }
    if let Some(ca) = &cfg.nats_tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &cfg.nats_tls_client {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if let Some(creds) = &cfg.nats_creds {
        opts = opts
            .credentials_file(creds)
            .await
            .map_err(|e| format!("cannot read cluster.nats_creds {}: {e}", creds.display()))?;
    }
    Ok(opts)
}

/// The configured servers (each parses: the config was validated).
fn addrs(cfg: &ClusterConfig) -> Vec<async_nats::ServerAddr> {
    cfg.nats_urls
        .iter()
        .filter_map(|u| u.parse().ok())
        .collect()
}

/// One connection attempt (for `shardcast check`).
pub(super) async fn connect_once(cfg: &ClusterConfig) -> Result<async_nats::Client, String> {
    options(cfg)
        .await?
        .connect(addrs(cfg))
        .await
        .map_err(|e| format!("cannot connect to NATS {:?}: {e}", cfg.nats_urls))
}

/// Connect in the background: the client returns at once and keeps
/// (re)connecting; publishes fail with 503 meanwhile.
pub(super) async fn connect(cfg: &ClusterConfig) -> async_nats::Client {
    loop {
        let opts = match options(cfg).await {
            Ok(o) => o.retry_on_initial_connect().max_reconnects(None),
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the NATS connection; retrying");
                tokio::time::sleep(crate::limits::LOG_SETUP_RETRY_INTERVAL * 5).await;
                continue;
            }
        };
        match opts.connect(addrs(cfg)).await {
            Ok(c) => return c,
            Err(e) => {
                tracing::error!(urls = ?cfg.nats_urls, error = %e, "cannot set up the NATS connection; retrying");
                tokio::time::sleep(crate::limits::LOG_SETUP_RETRY_INTERVAL * 5).await;
            }
        }
    }
}

/// `tenant`'s stream: created if absent; present, it must take the
/// tenant's subject and have `cluster.replicas` replicas.
pub(super) async fn stream(ctx: &Ctx, tenant: &str) -> Result<stream::Stream, String> {
    let name = stream_name(&ctx.cfg, tenant);
    let subject = subject(&ctx.cfg, tenant);
    match ctx.js.get_stream(&name).await {
        Ok(mut s) => {
            let info = s
                .info()
                .await
                .map_err(|e| format!("JetStream stream {name}: {e}"))?;
            if info.config.num_replicas != ctx.cfg.replicas {
                return Err(format!(
                    "JetStream stream {name} has {} replicas, cluster.replicas says {}: change one of them",
                    info.config.num_replicas, ctx.cfg.replicas
                ));
            }
            if !info.config.subjects.contains(&subject) {
                return Err(format!(
                    "JetStream stream {name} does not take subject {subject} (it takes {:?})",
                    info.config.subjects
                ));
            }
            Ok(s)
        }
        Err(e)
            if matches!(
                e.kind(),
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(ref j)
                    if j.error_code() == async_nats::jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            tracing::info!(stream = %name, replicas = ctx.cfg.replicas, "creating the JetStream stream");
            ctx.js
                .create_stream(stream::Config {
                    name: name.clone(),
                    subjects: vec![subject],
                    num_replicas: ctx.cfg.replicas,
                    storage: stream::StorageType::File,
                    duplicate_window: crate::limits::LOG_DUPLICATE_WINDOW,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("cannot create JetStream stream {name}: {e}"))
        }
        Err(e) => Err(format!("JetStream stream {name}: {e}")),
    }
}

/// Every `LOG_PROBE_INTERVAL`: is NATS connected, and does each stream
/// answer (its leader is elected, so appends can be taken)?
pub(super) async fn probe(ctx: Rc<Ctx>, tenants: Vec<String>) {
    loop {
        let connected = ctx.client.connection_state() == async_nats::connection::State::Connected;
        ctx.health.set_connected(connected);
        for t in &tenants {
            let name = stream_name(&ctx.cfg, t);
            let answer = tokio::time::timeout(LOG_PROBE_INTERVAL * 2, async {
                let mut s = ctx.js.get_stream(&name).await.map_err(|e| e.to_string())?;
                let info = s.info().await.map_err(|e| e.to_string())?;
                Ok::<_, String>((info.state.last_sequence, quorum(info)))
            })
            .await;
            ctx.health.tenant(t, |h| match answer {
                Ok(Ok((last, quorum))) => {
                    h.stream_last = last;
                    h.unavailable = quorum
                        .err()
                        .map(|why| format!("JetStream stream {name}: {why}"));
                }
                Ok(Err(e)) => {
                    h.unavailable = Some(format!("JetStream stream {name} does not answer: {e}"))
                }
                Err(_) => {
                    h.unavailable = Some(format!(
                        "JetStream stream {name} does not answer (no quorum?)"
                    ))
                }
            });
        }
        tokio::time::sleep(LOG_PROBE_INTERVAL).await;
    }
}

/// Whether the stream can take appends: a leader, and with it a majority of
/// its replicas current (what JetStream needs to acknowledge a publish).
fn quorum(info: &stream::Info) -> Result<(), String> {
    let replicas = info.config.num_replicas.max(1);
    let Some(cluster) = &info.cluster else {
        return Ok(()); // a single server, not clustered
    };
    if cluster.leader.is_none() {
        return Err("no leader (no quorum of its replicas)".into());
    }
    let current = 1 + cluster
        .replicas
        .iter()
        .filter(|p| p.current && !p.offline)
        .count();
    if current * 2 <= replicas {
        return Err(format!(
            "{current} of {replicas} replicas current: no quorum"
        ));
    }
    Ok(())
}
