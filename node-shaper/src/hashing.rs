//! A fast hasher for the agent's per-pass sets of 100,000 networks.
//!
//! std's SipHash costs ~30-50 ns per network; at 100,000 entries a pass
//! that hashes the list three or four times (duplicates, the remembered
//! tree, the tamper fingerprint) spent more than the 20 ms a one-entry
//! change has. This is a multiply-rotate hash (FxHash's step) with a
//! final avalanche, seeded once per process from std's random state, so
//! the layout of a table is not predictable from outside the process.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;

/// Builds [`FastHasher`]s with this process's seed.
#[derive(Clone, Copy, Debug)]
pub struct Fast {
    seed: u64,
}

impl Default for Fast {
    fn default() -> Self {
        static SEED: OnceLock<u64> = OnceLock::new();
        Fast {
            seed: *SEED
                .get_or_init(|| std::collections::hash_map::RandomState::new().hash_one(0xe9u8)),
        }
    }
}

impl BuildHasher for Fast {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.seed)
    }
}

/// See the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        // murmur3's fmix64: every input bit reaches the bits a table uses.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.add(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.add(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.add(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
}

/// A `HashMap` with [`Fast`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, Fast>;
/// A `HashSet` with [`Fast`].
pub type FastSet<K> = std::collections::HashSet<K, Fast>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_spread_over_a_table() {
        // 100,000 /32s differing in a few bits land in distinct buckets of
        // a 2^17 table about as often as a random function would.
        let f = Fast::default();
        let mut buckets = std::collections::HashSet::new();
        for i in 0..100_000u32 {
            let net: ipnet::IpNet =
                format!("{}.{}.{}.7/32", 11 + (i >> 16), (i >> 8) & 255, i & 255)
                    .parse()
                    .expect("net");
            buckets.insert(f.hash_one(net) & ((1 << 17) - 1));
        }
        // A random function fills ~1 - e^(-100000/131072) = 53.4% of them.
        assert!(buckets.len() > 65_000, "{}", buckets.len());
        assert_eq!(
            f.hash_one(7u32),
            Fast::default().hash_one(7u32),
            "one seed per process"
        );
    }
}
