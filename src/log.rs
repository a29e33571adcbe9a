//! Logging that can neither take the server down nor flood the disk.
//!
//! * `say!` / `say_err!`: a line on stdout / stderr that is dropped, not a
//!   panic, when the stream is closed or its disk is full (std's `println!`
//!   panics then). tracing's own writer is set up not to complain on stderr
//!   about failed writes (`main::init_logs`), for the same reason.
//! * `Repeated`: a failure that can repeat once per commit or per client is
//!   logged the first time, then at most once per interval with the count of
//!   those not logged in between.

use std::time::{Duration, Instant};

/// Write a line to stdout; a failed write is dropped.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Write a line to stderr; a failed write is dropped.
#[macro_export]
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// How often a repeating failure is logged at most.
pub const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One kind of repeating failure (say, one tenant's failing commits).
#[derive(Debug)]
pub struct Repeated {
    last_logged: Option<Instant>,
    /// Occurrences since the last logged one.
    unlogged: u64,
    interval: Duration,
}

impl Default for Repeated {
    fn default() -> Self {
        Repeated::every(REPEAT_LOG_INTERVAL)
    }
}

impl Repeated {
    pub fn every(interval: Duration) -> Repeated {
        Repeated {
            last_logged: None,
            unlogged: 0,
            interval,
        }
    }

    /// One more occurrence at `now`. `Some(n)`: log this one, saying that
    /// `n` others were not logged since the last; `None`: stay quiet.
    pub fn occur(&mut self, now: Instant) -> Option<u64> {
        match self.last_logged {
            Some(t) if now.saturating_duration_since(t) < self.interval => {
                self.unlogged += 1;
                None
            }
            _ => {
                self.last_logged = Some(now);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }

    /// The failure stopped (a commit succeeded): the next one is logged at
    /// once. Returns how many went unlogged since the last logged one.
    pub fn clear(&mut self) -> u64 {
        self.last_logged = None;
        std::mem::take(&mut self.unlogged)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_first_then_once_per_interval_with_counts() {
        let t0 = Instant::now();
        let mut r = Repeated::every(Duration::from_secs(10));
        assert_eq!(r.occur(t0), Some(0));
        for i in 1..=99 {
            assert_eq!(r.occur(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(r.occur(t0 + Duration::from_secs(10)), Some(99));
        assert_eq!(r.occur(t0 + Duration::from_secs(11)), None);
        assert_eq!(r.clear(), 1);
        assert_eq!(r.occur(t0 + Duration::from_secs(12)), Some(0));
    }
}
