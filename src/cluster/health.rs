//! What the cluster thread knows of JetStream, for `/health?mode=readiness`
//! and `/metrics`: whether NATS is reachable, each tenant's stream as last
//! probed, whether its consumer follows it, and whether appends are taken.
//!
//! The cluster thread writes it; the writer reads it when asked for
//! readiness. A mutex, off the request and fan-out paths: only probes,
//! publishes' outcomes and readiness checks touch it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A publish failure older than this no longer makes the node unready if
/// no publish succeeded since (nothing was asked of it meanwhile).
const PUBLISH_FAILURE_SHOWN: Duration = Duration::from_secs(30);

#[derive(Default)]
pub struct Health {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    connected: bool,
    last_publish_ok: Option<Instant>,
    last_publish_failure: Option<(Instant, String)>,
    tenants: HashMap<String, TenantLog>,
}

/// One tenant's stream, as this node sees it.
#[derive(Debug, Clone, Default)]
pub struct TenantLog {
    /// The stream's last sequence at the last probe.
    pub stream_last: u64,
    /// Why this replica cannot follow the stream (replicas differ, the
    /// replica is ahead of the stream, a gap), if so: set by the consumer.
    pub problem: Option<String>,
    /// Why the stream does not answer now (no quorum, unreachable), if
    /// so: set by the probe.
    pub unavailable: Option<String>,
    /// Consecutive idle checks of the consumer that found the stream
    /// holding more than was delivered.
    pub stalled_checks: u32,
    /// The consumer follows the stream now (what this node's own appends
    /// need to be answered).
    pub following: bool,
}

impl Health {
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        // A panic elsewhere while holding it leaves the state readable.
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s)
    }

    pub fn set_connected(&self, connected: bool) {
        self.with(|s| s.connected = connected);
    }

    pub fn published(&self) {
        self.with(|s| s.last_publish_ok = Some(Instant::now()));
    }

    pub fn publish_failed(&self, why: String) {
        self.with(|s| s.last_publish_failure = Some((Instant::now(), why)));
    }

    pub fn tenant(&self, name: &str, f: impl FnOnce(&mut TenantLog)) {
        self.with(|s| f(s.tenants.entry(name.to_string()).or_default()));
    }

    /// Whether `tenant` can take appends through the log now, or why not.
    pub fn ready(&self, tenant: &str) -> Result<(), String> {
        self.with(|s| {
            if !s.connected {
                return Err("NATS is unreachable (cluster.nats_urls)".into());
            }
            match s.tenants.get(tenant) {
                Some(t) => {
                    if let Some(p) = t.problem.as_ref().or(t.unavailable.as_ref()) {
                        return Err(p.clone());
                    }
                    if !t.following {
                        return Err("not following its JetStream stream yet".into());
                    }
                }
                None => return Err("its JetStream stream is not set up yet".into()),
            }
            if let Some((at, why)) = &s.last_publish_failure {
                let recovered = s.last_publish_ok.is_some_and(|ok| ok > *at);
                if !recovered && at.elapsed() < PUBLISH_FAILURE_SHOWN {
                    return Err(format!("JetStream did not take the last append: {why}"));
                }
            }
            Ok(())
        })
    }
}

impl crate::writer::LogStatus for Health {
    fn ready(&self, tenant: &str) -> Result<(), String> {
        Health::ready(self, tenant)
    }
    fn stream_last(&self, tenant: &str) -> Option<u64> {
        self.with(|s| s.tenants.get(tenant).map(|t| t.stream_last))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_connection_problems_and_publishes() {
        let h = Health::default();
        assert!(h.ready("a").unwrap_err().contains("unreachable"));
        h.set_connected(true);
        assert!(h.ready("a").unwrap_err().contains("not set up yet"));
        h.tenant("a", |_| {});
        assert!(h.ready("a").unwrap_err().contains("not following"));
        h.tenant("a", |t| t.following = true);
        h.tenant("b", |t| t.following = true);
        assert_eq!(h.ready("a"), Ok(()));
        h.tenant("a", |t| t.problem = Some("no quorum".into()));
        assert_eq!(h.ready("a"), Err("no quorum".into()));
        assert_eq!(h.ready("b"), Ok(()), "another tenant's stream is its own");
        h.tenant("a", |t| t.problem = None);
        h.publish_failed("timed out".into());
        assert!(h.ready("b").unwrap_err().contains("timed out"));
        h.published();
        assert_eq!(h.ready("b"), Ok(()), "a later success clears it");
    }
}
