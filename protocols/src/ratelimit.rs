//! Per-sender rate limiting of gossip: a token bucket per author, in a bounded table.
//!
//! Valid messages are cheap to make, so a peer could flood valid heartbeats or probes at any
//! rate; each one would reach an actor's (unbounded) mailbox. The network asks
//! [`RateLimiter::allow`] before handing a message on; messages over the rate are dropped
//! (ignored, not penalised: a burst after a partition heals is legitimate).

use std::collections::HashMap;
use std::hash::Hash;

/// Token buckets keyed by sender.
#[derive(Debug, Clone)]
pub struct RateLimiter<K: Eq + Hash + Clone> {
    rate_per_sec: f64,
    burst: f64,
    max_senders: usize,
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ms: u64,
}

impl<K: Eq + Hash + Clone> RateLimiter<K> {
    /// Allows `rate_per_sec` messages per second per sender, bursts of up to `burst`, and tracks
    /// at most `max_senders` senders.
    pub fn new(rate_per_sec: f64, burst: u32, max_senders: usize) -> Self {
        Self {
            rate_per_sec,
            burst: f64::from(burst.max(1)),
            max_senders: max_senders.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether a message from `sender` at `now_ms` is within its rate (and takes a token).
    pub fn allow(&mut self, sender: &K, now_ms: u64) -> bool {
        if !self.buckets.contains_key(sender) && self.buckets.len() >= self.max_senders {
            self.evict_idle(now_ms);
            if self.buckets.len() >= self.max_senders {
                return false;
            }
        }
        let (rate, burst) = (self.rate_per_sec, self.burst);
        let bucket = self.buckets.entry(sender.clone()).or_insert(Bucket {
            tokens: burst,
            last_ms: now_ms,
        });
        let elapsed_s = now_ms.saturating_sub(bucket.last_ms) as f64 / 1e3;
        bucket.tokens = (bucket.tokens + elapsed_s * rate).min(burst);
        bucket.last_ms = now_ms;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Drops senders whose bucket has refilled completely (they have been quiet).
    fn evict_idle(&mut self, now_ms: u64) {
        let (rate, burst) = (self.rate_per_sec, self.burst);
        self.buckets.retain(|_, b| {
            let refill = now_ms.saturating_sub(b.last_ms) as f64 / 1e3 * rate;
            b.tokens + refill < burst
        });
    }

    /// Senders tracked now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    /// Whether no sender is tracked.
    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_the_rate_applies() {
        let mut limiter = RateLimiter::new(2.0, 3, 10);
        let allowed = (0..10).filter(|_| limiter.allow(&"a", 0)).count();
        assert_eq!(allowed, 3);
        assert!(!limiter.allow(&"a", 499));
        assert!(limiter.allow(&"a", 500));
        // Another sender has its own bucket.
        assert!(limiter.allow(&"b", 500));
    }

    #[test]
    fn the_table_is_bounded_and_quiet_senders_make_room() {
        let mut limiter = RateLimiter::new(1.0, 1, 2);
        assert!(limiter.allow(&1, 0));
        assert!(limiter.allow(&2, 0));
        assert!(!limiter.allow(&3, 0), "table full, nobody idle");
        assert_eq!(limiter.len(), 2);
        assert!(
            limiter.allow(&3, 5_000),
            "1 and 2 refilled and were evicted"
        );
        assert!(limiter.len() <= 2);
    }
}
