//! Time-ordered event ids (UUIDv7, RFC 9562) generated per shard with no
//! shared state: 48 bits of Unix milliseconds, a 12-bit counter that keeps ids
//! from one shard ordered within a millisecond, and 62 random bits that keep
//! ids from different shards apart. Also the process's tenant numbers.

use std::time::{SystemTime, UNIX_EPOCH};

/// A tenant's number for the life of the process; never reused, so a tenant
/// removed and added again starts clean everywhere (reader connections,
/// shard rings).
pub type TenantId = u32;

pub struct IdGen {
    last_ms: u64,
    counter: u16,
    rng: u64,
}

impl Default for IdGen {
    fn default() -> Self {
        Self::new()
    }
}

impl IdGen {
    pub fn new() -> IdGen {
        let mut seed = [0u8; 8];
        // SAFETY: getrandom writes at most seed.len() bytes into seed.
        let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
        let mut rng = u64::from_ne_bytes(seed);
        if n != 8 || rng == 0 {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            rng = t ^ (std::process::id() as u64) << 32 | 1;
        }
        IdGen {
            last_ms: 0,
            counter: 0,
            rng,
        }
    }

    fn rand(&mut self) -> u64 {
        // xorshift64*: not for secrets, only for spreading ids apart.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn next_bytes(&mut self) -> [u8; 16] {
        let mut ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if ms <= self.last_ms {
            // Same millisecond (or the clock stepped back): count on from the last id.
            ms = self.last_ms;
            self.counter += 1;
            if self.counter > 0x0FFF {
                ms += 1;
                self.counter = (self.rand() & 0x07FF) as u16;
            }
        } else {
            // Start each millisecond at a random point in the lower half, leaving room to count.
            self.counter = (self.rand() & 0x07FF) as u16;
        }
        self.last_ms = ms;
        let r = self.rand();
        let mut b = [0u8; 16];
        b[0..6].copy_from_slice(&ms.to_be_bytes()[2..8]);
        b[6] = 0x70 | ((self.counter >> 8) as u8 & 0x0F);
        b[7] = self.counter as u8;
        b[8..16].copy_from_slice(&r.to_be_bytes());
        b[8] = 0x80 | (b[8] & 0x3F);
        b
    }

    pub fn next_string(&mut self) -> String {
        uuid::Uuid::from_bytes(self.next_bytes())
            .hyphenated()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_v7_and_ordered() {
        let mut g = IdGen::new();
        let ids: Vec<String> = (0..10_000).map(|_| g.next_string()).collect();
        for w in ids.windows(2) {
            assert!(w[0] < w[1], "{} !< {}", w[0], w[1]);
        }
        let u = uuid::Uuid::parse_str(&ids[0]).unwrap();
        assert_eq!(u.get_version_num(), 7);
        assert_eq!(u.get_variant(), uuid::Variant::RFC4122);
    }
}
