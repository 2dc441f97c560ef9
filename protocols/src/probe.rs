//! Gossip probes: timestamped messages used to measure propagation latency across the mesh.
//!
//! A probe carries its origin and send time; every receiver records `received - sent` in a
//! bounded [`ProbeLog`]. Peers on one machine share a clock, so the simulation harness reads
//! one-way latencies directly; across machines the figures include clock offset.

use std::collections::{BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::{PeerKey, WireError, decode_bounded, encode};

/// Largest probe accepted from the wire, in bytes.
pub const MAX_PROBE_BYTES: usize = 256;

/// A latency probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    /// The sender's key.
    pub origin: PeerKey,
    /// Sequence number at the sender.
    pub seq: u64,
    /// Sender's wall clock when published (unix µs).
    pub sent_at_unix_us: u64,
}

impl Probe {
    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes a probe received from the network.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, WireError> {
        decode_bounded(bytes, MAX_PROBE_BYTES)
    }
}

/// One received probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSample {
    /// The sender's key.
    pub origin: PeerKey,
    /// Sequence number at the sender.
    pub seq: u64,
    /// Receive time minus send time, in µs (0 if the clocks disagree the other way).
    pub latency_us: u64,
}

/// The most recent probes received, bounded and de-duplicated.
#[derive(Debug, Clone)]
pub struct ProbeLog {
    capacity: usize,
    samples: VecDeque<ProbeSample>,
    seen: BTreeSet<(PeerKey, u64)>,
}

impl ProbeLog {
    /// A log keeping the last `capacity` samples.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            samples: VecDeque::new(),
            seen: BTreeSet::new(),
        }
    }

    /// Records a probe received at `now_unix_us`; duplicates are ignored.
    pub fn record(&mut self, probe: &Probe, now_unix_us: u64) -> Option<ProbeSample> {
        if !self.seen.insert((probe.origin, probe.seq)) {
            return None;
        }
        let sample = ProbeSample {
            origin: probe.origin,
            seq: probe.seq,
            latency_us: now_unix_us.saturating_sub(probe.sent_at_unix_us),
        };
        self.samples.push_back(sample);
        while self.samples.len() > self.capacity {
            if let Some(old) = self.samples.pop_front() {
                self.seen.remove(&(old.origin, old.seq));
            }
        }
        Some(sample)
    }

    /// Samples held, oldest first.
    pub fn samples(&self) -> impl Iterator<Item = &ProbeSample> {
        self.samples.iter()
    }
}

/// The `q`-quantile (0..=1) of `values` by nearest rank; `None` when empty.
pub fn quantile(values: &mut [u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = ((q.clamp(0.0, 1.0) * values.len() as f64).ceil() as usize).max(1);
    Some(values[rank - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_bounded_and_deduplicates() {
        let mut log = ProbeLog::new(2);
        let p = |seq| Probe {
            origin: [1; 32],
            seq,
            sent_at_unix_us: 100,
        };
        assert!(log.record(&p(1), 150).is_some());
        assert!(log.record(&p(1), 160).is_none());
        log.record(&p(2), 300);
        log.record(&p(3), 400);
        let lat: Vec<u64> = log.samples().map(|s| s.latency_us).collect();
        assert_eq!(lat, vec![200, 300]);
    }

    #[test]
    fn quantiles_use_nearest_rank() {
        let mut v: Vec<u64> = (1..=100).collect();
        assert_eq!(quantile(&mut v, 0.5), Some(50));
        assert_eq!(quantile(&mut v, 0.99), Some(99));
        assert_eq!(quantile(&mut v, 1.0), Some(100));
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn probe_decoding_is_bounded() {
        assert!(Probe::from_bytes(&[0u8; MAX_PROBE_BYTES + 1]).is_err());
    }
}
