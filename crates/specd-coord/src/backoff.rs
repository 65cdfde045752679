//! `Backoff`: capped exponential retry delays with a little jitter, used by every reconnect loop in the
//! crate (etcd watches, lease keep-alive, registration).
//!
//! Jitter keeps a fleet that lost etcd at the same moment from reconnecting in lock-step. It is drawn
//! from a small xorshift generator seeded per instance; no randomness crate is needed for this.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Exponential backoff: `initial`, doubling up to `max`, each delay stretched by up to 25 % jitter.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
    rng: u64,
}

impl Backoff {
    /// A backoff starting at `initial` and capped at `max` (before jitter).
    pub fn new(initial: Duration, max: Duration) -> Self {
        let seed = RandomState::new().hash_one(0x5eed_u64) | 1;
        Backoff {
            initial,
            max: max.max(initial),
            next: initial,
            rng: seed,
        }
    }

    /// The reconnect default: 50 ms doubling to 2 s.
    pub fn reconnect() -> Self {
        Backoff::new(Duration::from_millis(50), Duration::from_secs(2))
    }

    /// The next delay to wait; grows the following one.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        // xorshift64: cheap, good enough to spread retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let frac = (self.rng % 1024) as f64 / 1024.0; // [0, 1)
        base + base.mul_f64(0.25 * frac)
    }

    /// Back to the initial delay, after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn delays_grow_to_the_cap_and_reset(initial_ms in 1u64..500, max_ms in 1u64..5000, n in 1usize..40) {
            let initial = Duration::from_millis(initial_ms);
            let max = Duration::from_millis(max_ms).max(initial);
            let mut b = Backoff::new(initial, max);
            let mut base = initial;
            for _ in 0..n {
                let d = b.next_delay();
                prop_assert!(d >= base, "{d:?} < base {base:?}");
                prop_assert!(d <= base + base / 4, "{d:?} above jitter bound of {base:?}");
                prop_assert!(d <= max + max / 4);
                base = (base * 2).min(max);
            }
            b.reset();
            let d = b.next_delay();
            prop_assert!(d >= initial && d <= initial + initial / 4);
        }
    }
}
