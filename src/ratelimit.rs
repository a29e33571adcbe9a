//! Per-client rate limiting: a token bucket per client address, kept by each
//! shard for the connections it serves. Shards share nothing: a shard's table
//! is a `RefCell<HashMap>` on its own thread, so there is no lock and no atomic
//! between cores. The price is that a client whose connections land on
//! different shards (SO_REUSEPORT hashes each connection) may get up to
//! `shards ×` the configured rate; one keep-alive connection is limited exactly.
//!
//! The bucket is kept as GCRA (the "generic cell rate algorithm"): one
//! timestamp per client, the time at which its bucket will be full again
//! (`TAT`). A request is allowed when, after adding one request's worth of
//! time (`1 / per_second`), the bucket is at most `burst` requests "in debt";
//! a refused request costs nothing. This is exactly a token bucket of size
//! `burst` refilled at `per_second`, with fractional rates and no rounding.
//!
//! Memory is bounded: a bucket whose TAT has passed is full, which is the same
//! as not being tracked, so a sweep once a second (and whenever the table is at
//! its cap) drops those. At most `rate_limit.max_tracked_addresses` are
//! tracked per shard; while the table is full of clients that are all still
//! refilling, further clients are not added but share one overflow bucket of
//! one client's size and rate. A flood of distinct addresses therefore costs
//! at most the cap's worth of memory and gets one client's rate in total, while
//! clients already tracked keep their own buckets.
//!
//! A table entry is a 16-byte key and an 8-byte TAT (24 bytes) plus the hash
//! table's one control byte, at a load between 7/16 and 7/8: 29 to 57 bytes per
//! tracked address, so 100,000 addresses take at most 5.5 MiB per shard.
//!
//! Client addresses: IPv4 addresses are tracked whole, IPv6 addresses by their
//! /64 prefix (one host usually holds a whole /64, so per-address buckets would
//! be free for it to multiply). `X-Forwarded-For` is believed only from peers in
//! `server.trusted_proxies`; see [`forwarded_client`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Per-client request rate limit (`[rate_limit]` in the config), enforced by each shard alone.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Sustained requests per second per client address; 0: no rate limit.
    pub per_second: f64,
    /// Requests a client may make at once after being idle (the bucket's size).
    pub burst: u32,
    /// Client addresses each shard tracks at most; beyond, new clients share one bucket.
    pub max_tracked_addresses: usize,
}

impl RateLimitConfig {
    pub fn enabled(&self) -> bool {
        self.per_second > 0.0
    }
}

/// How often each shard drops the buckets that have refilled.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// At the cap, a sweep runs on insertion at most this often (a sweep is a pass
/// over the table; this keeps a flood of new addresses from making every
/// request pay for one).
const SWEEP_AT_CAP_MIN_GAP_NS: u64 = 100_000_000;
/// The overflow warning is logged at most this often.
const OVERFLOW_WARNING_GAP_NS: u64 = 60_000_000_000;

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`) or a single address.
/// IPv4 networks are held as IPv4-mapped IPv6 ones, so one comparison serves both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    bits: u128,
    /// Prefix length in the IPv6 space (an IPv4 `/8` is `/104`).
    prefix: u32,
}

fn mask(prefix: u32) -> u128 {
    if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    }
}

/// An address as 128 bits, IPv4 (and IPv4-mapped IPv6) as `::ffff:a.b.c.d`.
fn bits_of(ip: IpAddr) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        bits_of(ip) & mask(self.prefix) == self.bits
    }
}

impl FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<IpNet, String> {
        let s = s.trim();
        let bad = || format!("'{s}' is not an IP address or a network like 10.0.0.0/8");
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l.parse::<u32>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| bad())?;
        let (max, offset) = match ip.to_canonical() {
            IpAddr::V4(_) => (32, 96),
            IpAddr::V6(_) => (128, 0),
        };
        let len = len.unwrap_or(max);
        if len > max {
            return Err(format!("'{s}': a prefix longer than {max} bits"));
        }
        let prefix = len + offset;
        let bits = bits_of(ip);
        if bits & !mask(prefix) != 0 {
            return Err(format!(
                "'{s}' has bits set past its /{len} prefix (did you mean the network address?)"
            ));
        }
        Ok(IpNet { bits, prefix })
    }
}

pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    trusted.iter().any(|n| n.contains(ip))
}

/// One `X-Forwarded-For` element: an address, or an address with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:80`), which some proxies write.
fn parse_forwarded(s: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(s).ok()?.trim();
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

/// The client of a request that came through the trusted proxy `peer`: walk
/// `X-Forwarded-For` (all such headers, as one list) from the right, skipping
/// addresses that are trusted proxies themselves; the first one that is not is
/// the client. Every proxy appends the address it received the request from,
/// so everything left of the right-most untrusted entry may be forged by the
/// client and is ignored. When every entry is a trusted proxy the left-most
/// is used; an entry that is not an address stops the walk at the last trusted
/// hop before it. `head` is the request head, `peer` the TCP peer.
pub fn forwarded_client(head: &[u8], peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
    let mut headers = [httparse::EMPTY_HEADER; crate::limits::REQUEST_HEADERS_MAX];
    let mut req = httparse::Request::new(&mut headers);
    if req.parse(head).is_err() {
        return peer;
    }
    let mut client = peer;
    for h in req
        .headers
        .iter()
        .rev()
        .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
    {
        for part in h.value.rsplit(|c| *c == b',') {
            match parse_forwarded(part) {
                Some(ip) => {
                    client = ip;
                    if !is_trusted(trusted, ip) {
                        return ip;
                    }
                }
                None => return client,
            }
        }
    }
    client
}

/// The key a client's bucket is filed under: IPv4 whole, IPv6 by /64.
fn key_of(ip: IpAddr) -> [u8; 16] {
    match ip.to_canonical() {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => (u128::from(a) & mask(64)).to_be_bytes(),
    }
}

/// A client's rate-limit identity as it appears in messages.
pub fn describe(ip: IpAddr) -> String {
    match ip.to_canonical() {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("{}/64", Ipv6Addr::from(u128::from(a) & mask(64))),
    }
}

/// One shard's rate limiter. Not `Sync`, by design: each shard has its own.
pub struct Limiter {
    /// Time one request costs: `1 / per_second`, in nanoseconds.
    interval_ns: u64,
    /// How far ahead of now a TAT may run: `burst` requests' worth.
    tolerance_ns: u64,
    max_tracked: usize,
    epoch: Instant,
    /// Client key → TAT (nanoseconds since `epoch`); absent means full.
    buckets: RefCell<HashMap<[u8; 16], u64>>,
    /// The TAT of the bucket shared by clients the full table could not take.
    overflow: Cell<u64>,
    last_sweep_ns: Cell<u64>,
    overflow_warned_ns: Cell<Option<u64>>,
    pub per_second: f64,
    pub burst: u32,
}

impl Limiter {
    /// None when the limit is off (`per_second = 0`).
    pub fn new(cfg: &RateLimitConfig) -> Option<Limiter> {
        if !cfg.enabled() {
            return None;
        }
        let interval_ns = ((1e9 / cfg.per_second).round() as u64).max(1);
        Some(Limiter {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(u64::from(cfg.burst)),
            max_tracked: cfg.max_tracked_addresses,
            epoch: Instant::now(),
            buckets: RefCell::new(HashMap::new()),
            overflow: Cell::new(0),
            last_sweep_ns: Cell::new(0),
            overflow_warned_ns: Cell::new(None),
            per_second: cfg.per_second,
            burst: cfg.burst,
        })
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Take one request from `client`'s bucket: Ok, or Err with the whole
    /// seconds (≥ 1) until the bucket holds a request again.
    pub fn check(&self, client: IpAddr) -> Result<(), u32> {
        self.check_at(key_of(client), self.now_ns())
    }

    fn check_at(&self, key: [u8; 16], now: u64) -> Result<(), u32> {
        let mut map = self.buckets.borrow_mut();
        if let Some(tat) = map.get_mut(&key) {
            return self.take(tat, now);
        }
        if map.len() >= self.max_tracked
            && now.saturating_sub(self.last_sweep_ns.get()) >= SWEEP_AT_CAP_MIN_GAP_NS
        {
            self.sweep_map(&mut map, now);
        }
        if map.len() >= self.max_tracked {
            drop(map);
            if self
                .overflow_warned_ns
                .get()
                .is_none_or(|t| now.saturating_sub(t) >= OVERFLOW_WARNING_GAP_NS)
            {
                self.overflow_warned_ns.set(Some(now));
                tracing::warn!(
                    tracked = self.max_tracked,
                    "rate limit table full: new client addresses share one bucket until entries refill (rate_limit.max_tracked_addresses)"
                );
            }
            let mut tat = self.overflow.get();
            let r = self.take(&mut tat, now);
            self.overflow.set(tat);
            return r;
        }
        // An untracked client's bucket is full: this request always fits.
        let mut tat = now;
        let r = self.take(&mut tat, now);
        map.insert(key, tat);
        r
    }

    fn take(&self, tat: &mut u64, now: u64) -> Result<(), u32> {
        let next = (*tat).max(now).saturating_add(self.interval_ns);
        if next - now > self.tolerance_ns {
            let wait_ns = next - self.tolerance_ns - now;
            let secs = wait_ns.div_ceil(1_000_000_000).max(1);
            Err(u32::try_from(secs).unwrap_or(u32::MAX))
        } else {
            *tat = next;
            Ok(())
        }
    }

    fn sweep_map(&self, map: &mut HashMap<[u8; 16], u64>, now: u64) {
        map.retain(|_, tat| *tat > now);
        // Give back a table that a flood grew, once it is mostly empty.
        if map.capacity() > 4096 && map.len() * 4 < map.capacity() {
            map.shrink_to(map.len() * 2);
        }
        self.last_sweep_ns.set(now);
    }

    /// Drop every bucket that has refilled; returns how many are still tracked.
    pub fn sweep(&self) -> usize {
        let now = self.now_ns();
        let mut map = self.buckets.borrow_mut();
        self.sweep_map(&mut map, now);
        map.len()
    }

    /// Client addresses currently tracked.
    pub fn tracked(&self) -> usize {
        self.buckets.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(per_second: f64, burst: u32, max: usize) -> Limiter {
        Limiter::new(&RateLimitConfig {
            per_second,
            burst,
            max_tracked_addresses: max,
        })
        .unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let l = limiter(10.0, 5, 100);
        let k = key_of(ip("10.0.0.1"));
        for _ in 0..5 {
            assert_eq!(l.check_at(k, S), Ok(()));
        }
        // Empty: the next token comes in 100 ms, which is reported as 1 s.
        assert_eq!(l.check_at(k, S), Err(1));
        assert_eq!(l.check_at(k, S + S / 10 - 1), Err(1));
        assert_eq!(l.check_at(k, S + S / 10), Ok(()));
        assert_eq!(l.check_at(k, S + S / 10), Err(1));
        // Refused requests cost nothing; after 0.5 s the whole burst is back.
        assert!(l.check_at(k, S + S / 10 + S / 2) == Ok(()));
        for _ in 0..4 {
            assert_eq!(l.check_at(k, S + S / 10 + S / 2), Ok(()));
        }
        assert!(l.check_at(k, S + S / 10 + S / 2).is_err());
        // Another client has its own bucket.
        assert_eq!(l.check_at(key_of(ip("10.0.0.2")), S), Ok(()));
    }

    #[test]
    fn retry_after_is_whole_seconds_from_the_refill() {
        let l = limiter(0.25, 1, 100); // one request per 4 s
        let k = key_of(ip("10.0.0.1"));
        assert_eq!(l.check_at(k, 10 * S), Ok(()));
        assert_eq!(l.check_at(k, 10 * S), Err(4));
        assert_eq!(l.check_at(k, 10 * S + S / 2), Err(4));
        assert_eq!(l.check_at(k, 13 * S), Err(1));
        assert_eq!(l.check_at(k, 14 * S), Ok(()));
    }

    #[test]
    fn full_buckets_are_swept_and_the_cap_holds() {
        let l = limiter(1.0, 2, 3);
        for i in 0..3 {
            assert!(l.check_at(key_of(ip(&format!("10.0.0.{i}"))), S).is_ok());
        }
        assert_eq!(l.tracked(), 3);
        // At the cap, with every bucket still refilling: newcomers share one
        // overflow bucket of one client's size.
        assert!(l.check_at(key_of(ip("10.0.1.1")), S).is_ok());
        assert!(l.check_at(key_of(ip("10.0.1.2")), S).is_ok());
        assert!(l.check_at(key_of(ip("10.0.1.3")), S).is_err());
        assert_eq!(l.tracked(), 3);
        // Tracked clients are unaffected.
        assert!(l.check_at(key_of(ip("10.0.0.0")), S).is_ok());
        // Once their buckets refill they are swept on the next insertion.
        assert!(l.check_at(key_of(ip("10.0.2.1")), 4 * S).is_ok());
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn table_memory_per_address_is_as_documented() {
        // The entry layout the module docs count: 16-byte key, 8-byte TAT.
        assert_eq!(std::mem::size_of::<([u8; 16], u64)>(), 24);
        let l = limiter(0.01, 1, 1_000_000);
        for n in [1_000u32, 50_000, 100_000] {
            for i in 0..n {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
                let _ = l.check_at(key_of(ip), S);
            }
            let map = l.buckets.borrow();
            assert_eq!(map.len(), n as usize);
            // hashbrown: buckets = next power of two ≥ capacity × 8/7, each
            // 24 bytes of entry and 1 control byte.
            let buckets = (map.capacity() * 8 / 7).next_power_of_two();
            let per_address = (buckets * 25) as f64 / n as f64;
            assert!(per_address <= 57.5, "{n}: {per_address} B per address");
        }
    }

    #[test]
    fn ipv6_is_tracked_by_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(
            key_of(ip("2001:db8:1:2:aaaa::1")),
            key_of(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(key_of(ip("2001:db8:1:2::1")), key_of(ip("2001:db8:1:3::1")));
        assert_eq!(key_of(ip("::ffff:10.1.2.3")), key_of(ip("10.1.2.3")));
        assert_eq!(describe(ip("2001:db8:1:2:aaaa::1")), "2001:db8:1:2::/64");
    }

    #[test]
    fn networks() {
        let n: IpNet = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.200.1.1")));
        assert!(n.contains(ip("::ffff:10.200.1.1")));
        assert!(!n.contains(ip("11.0.0.1")));
        let one: IpNet = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let v6: IpNet = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert!(!v6.contains(ip("10.0.0.1")));
        let all: IpNet = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("8.8.8.8")));
        assert!("10.0.0.1/8".parse::<IpNet>().is_err());
        assert!("10.0.0.0/33".parse::<IpNet>().is_err());
        assert!("localhost".parse::<IpNet>().is_err());
    }

    #[test]
    fn forwarded_for_is_read_from_the_right() {
        let trusted: Vec<IpNet> = vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let peer = ip("127.0.0.1");
        let head = |xff: &[&str]| {
            let mut h = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
            for v in xff {
                h.push_str(&format!("X-Forwarded-For: {v}\r\n"));
            }
            h.push_str("\r\n");
            h
        };
        let client = |xff: &[&str]| forwarded_client(head(xff).as_bytes(), peer, &trusted);
        assert_eq!(client(&[]), peer);
        assert_eq!(client(&["203.0.113.7"]), ip("203.0.113.7"));
        // A forged left part is ignored; trusted hops on the right are skipped.
        assert_eq!(
            client(&["1.1.1.1, 203.0.113.7, 10.1.1.1"]),
            ip("203.0.113.7")
        );
        // Several headers are one list, in order.
        assert_eq!(
            client(&["1.1.1.1", "203.0.113.7 , 10.1.1.1"]),
            ip("203.0.113.7")
        );
        assert_eq!(client(&["203.0.113.7", "10.1.1.1"]), ip("203.0.113.7"));
        // Ports are tolerated.
        assert_eq!(client(&["203.0.113.7:5555"]), ip("203.0.113.7"));
        assert_eq!(client(&["[2001:db8::1]:80"]), ip("2001:db8::1"));
        // Garbage stops the walk at the last trusted hop.
        assert_eq!(client(&["garbage, 10.2.2.2"]), ip("10.2.2.2"));
        assert_eq!(client(&["garbage"]), peer);
        // All trusted: the left-most.
        assert_eq!(client(&["10.3.3.3, 10.2.2.2"]), ip("10.3.3.3"));
    }
}
