//! Exponential backoff with jitter, as a pure value: callers pass in the random value.
//!
//! Used for restarting failed actors and for redialing peers; every retry loop in Loom is bounded
//! by a `Backoff` (a maximum delay) and by the caller's own attempt limit.

/// Exponential backoff: `base * 2^attempt`, capped at `max`, with up to 50% jitter subtracted.
#[derive(Debug, Clone)]
pub struct Backoff {
    base_ms: u64,
    max_ms: u64,
    attempt: u32,
}

impl Backoff {
    /// A backoff starting at `base_ms` and never exceeding `max_ms`.
    pub fn new(base_ms: u64, max_ms: u64) -> Self {
        Self {
            base_ms: base_ms.max(1),
            max_ms: max_ms.max(base_ms.max(1)),
            attempt: 0,
        }
    }

    /// How many delays have been handed out since the last reset.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The next delay in milliseconds; `jitter_unit` is a random value in `[0, 1)`.
    pub fn next_delay_ms(&mut self, jitter_unit: f64) -> u64 {
        let exp = self.attempt.min(30);
        self.attempt = self.attempt.saturating_add(1);
        let raw = self.base_ms.saturating_mul(1u64 << exp).min(self.max_ms);
        let jitter = (raw as f64 * 0.5 * jitter_unit.clamp(0.0, 1.0)) as u64;
        raw - jitter
    }

    /// Starts over from the base delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap() {
        let mut b = Backoff::new(100, 1_000);
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay_ms(0.0)).collect();
        assert_eq!(delays, vec![100, 200, 400, 800, 1_000, 1_000]);
        b.reset();
        assert_eq!(b.next_delay_ms(0.0), 100);
    }

    #[test]
    fn jitter_never_exceeds_half() {
        let mut b = Backoff::new(1_000, 1_000);
        assert_eq!(b.next_delay_ms(0.999_999), 501);
    }
}
