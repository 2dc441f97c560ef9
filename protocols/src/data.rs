//! Training data that every peer derives identically: the built-in task (text from a seeded
//! Markov source whose entropy rate, and so the loss floor, is known exactly) and the
//! deterministic assignment of batches to peers per round.
//!
//! The Markov source has an alphabet of [`ALPHABET`] and order 2: each pair of previous symbols
//! has its own next-symbol distribution, a few likely symbols plus a small floor, drawn from the
//! seed. Its entropy rate `H = Σ π(ctx) · H(P(·|ctx))` (π the stationary distribution over pairs)
//! is the lowest cross-entropy any model can reach on its text, so a trained model's validation
//! loss can be read against it.
//!
//! Randomness comes from SplitMix64 seeded by the caller, so the same seed gives the same text,
//! model and shards on every machine and every version of every dependency.

/// The symbols of the built-in task.
pub const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz .,;!\n";
const V: usize = ALPHABET.len();
const CONTEXTS: usize = V * V;

/// SplitMix64: a small, fast, well-mixed 64-bit generator, deterministic across platforms.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform value in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A uniform value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift: unbiased enough for n far below 2^64.
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }
}

/// An order-2 Markov source over [`ALPHABET`].
#[derive(Debug, Clone)]
pub struct MarkovSource {
    /// `cumulative[ctx][i]`: P(next ≤ i | ctx), for sampling.
    cumulative: Vec<[f64; V]>,
    /// `probs[ctx][i]`: P(next = i | ctx).
    probs: Vec<[f64; V]>,
    entropy_rate_nats: f64,
}

impl MarkovSource {
    /// The source for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x6c6f_6f6d_6d61_726b);
        // Each previous symbol favours 2 to 4 successors (the part a bigram model learns
        // quickly); each pair of previous symbols adds one favoured successor of its own (the
        // part only a model of both symbols learns). A floor on every symbol keeps the chain
        // irreducible.
        let mut by_last = vec![[0.0f64; V]; V];
        for row in by_last.iter_mut() {
            let favoured = 2 + rng.below(3) as usize;
            for _ in 0..favoured {
                row[rng.below(V as u64) as usize] += 0.5 + 2.0 * rng.next_f64();
            }
        }
        let mut probs = vec![[0.0f64; V]; CONTEXTS];
        for (ctx, row) in probs.iter_mut().enumerate() {
            let last = ctx % V;
            let mut weights = [0.02f64; V];
            for (w, b) in weights.iter_mut().zip(&by_last[last]) {
                *w += b;
            }
            weights[rng.below(V as u64) as usize] += 0.5 + 1.5 * rng.next_f64();
            let total: f64 = weights.iter().sum();
            for (p, w) in row.iter_mut().zip(weights) {
                *p = w / total;
            }
        }
        let cumulative = probs
            .iter()
            .map(|row| {
                let mut acc = 0.0;
                let mut out = [0.0; V];
                for (o, p) in out.iter_mut().zip(row) {
                    acc += p;
                    *o = acc;
                }
                out[V - 1] = 1.0;
                out
            })
            .collect();
        let entropy_rate_nats = entropy_rate(&probs);
        Self {
            cumulative,
            probs,
            entropy_rate_nats,
        }
    }

    /// The source's entropy rate in nats per symbol: the floor of the cross-entropy loss.
    pub fn entropy_rate_nats(&self) -> f64 {
        self.entropy_rate_nats
    }

    /// P(next = `symbol` | previous two symbols), symbols as alphabet indices.
    pub fn probability(&self, previous: [usize; 2], symbol: usize) -> f64 {
        self.probs[previous[0] * V + previous[1]][symbol]
    }

    /// `len` bytes of text drawn with `seed` (independent of the source's own seed).
    pub fn generate(&self, len: usize, seed: u64) -> Vec<u8> {
        let mut rng = SplitMix64::new(seed);
        let mut a = rng.below(V as u64) as usize;
        let mut b = rng.below(V as u64) as usize;
        let mut out = Vec::with_capacity(len);
        for _ in 0..len {
            let u = rng.next_f64();
            let row = &self.cumulative[a * V + b];
            let next = row.iter().position(|&c| u < c).unwrap_or(V - 1);
            out.push(ALPHABET[next]);
            a = b;
            b = next;
        }
        out
    }
}

/// Entropy rate of an order-2 chain: stationary distribution over contexts by power iteration,
/// then the average next-symbol entropy.
fn entropy_rate(probs: &[[f64; V]]) -> f64 {
    let mut pi = vec![1.0 / CONTEXTS as f64; CONTEXTS];
    for _ in 0..2_000 {
        let mut next = vec![0.0; CONTEXTS];
        for (ctx, &weight) in pi.iter().enumerate() {
            let b = ctx % V;
            for (c, p) in probs[ctx].iter().enumerate() {
                next[b * V + c] += weight * p;
            }
        }
        let delta: f64 = next.iter().zip(&pi).map(|(x, y)| (x - y).abs()).sum();
        pi = next;
        if delta < 1e-13 {
            break;
        }
    }
    pi.iter()
        .zip(probs)
        .map(|(w, row)| {
            w * -row
                .iter()
                .filter(|p| **p > 0.0)
                .map(|p| p * p.ln())
                .sum::<f64>()
        })
        .sum()
}

/// Start offsets of the `batch` sequences of length `context + 1` that `peer` trains on in
/// `round`, drawn from `seed`, the round and the peer's key: every peer computes every other
/// peer's shard, so a verifier can recompute a contribution on the same data.
pub fn batch_offsets(
    data_len: usize,
    context: usize,
    batch: usize,
    seed: u64,
    round: u64,
    peer: &crate::PeerKey,
) -> Vec<usize> {
    let span = data_len.saturating_sub(context + 1);
    if span == 0 {
        return vec![0; batch];
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"loom/shard/v1\0");
    hasher.update(&seed.to_le_bytes());
    hasher.update(&round.to_le_bytes());
    hasher.update(peer);
    let digest = hasher.finalize();
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest.as_bytes()[..8]);
    let mut rng = SplitMix64::new(u64::from_le_bytes(key));
    (0..batch)
        .map(|_| rng.below(span as u64 + 1) as usize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn the_same_seed_gives_the_same_source_and_text() {
        let a = MarkovSource::new(7);
        let b = MarkovSource::new(7);
        assert_eq!(a.generate(1_000, 1), b.generate(1_000, 1));
        assert_eq!(a.entropy_rate_nats(), b.entropy_rate_nats());
        assert_ne!(a.generate(1_000, 1), a.generate(1_000, 2));
        assert_ne!(
            MarkovSource::new(8).entropy_rate_nats(),
            a.entropy_rate_nats()
        );
        let text = a.generate(1_000, 1);
        assert!(text.iter().all(|c| ALPHABET.contains(c)));
    }

    #[test]
    fn every_context_is_a_distribution() {
        let source = MarkovSource::new(3);
        for a in 0..V {
            for b in 0..V {
                let sum: f64 = (0..V).map(|c| source.probability([a, b], c)).sum();
                assert!((sum - 1.0).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn the_empirical_entropy_of_generated_text_matches_the_entropy_rate() {
        let source = MarkovSource::new(42);
        let h = source.entropy_rate_nats();
        println!("entropy rate of seed 42: {h:.4} nats/symbol");
        assert!(h > 1.0 && h < 3.0, "entropy rate {h} nats");
        let text = source.generate(400_000, 9);
        let index: HashMap<u8, usize> = ALPHABET.iter().enumerate().map(|(i, c)| (*c, i)).collect();
        // Mean negative log-likelihood of the text under the true model: converges to H.
        let nll: f64 = text
            .windows(3)
            .map(|w| {
                -source
                    .probability([index[&w[0]], index[&w[1]]], index[&w[2]])
                    .ln()
            })
            .sum::<f64>()
            / (text.len() - 2) as f64;
        assert!((nll - h).abs() / h < 0.01, "nll {nll} vs entropy rate {h}");
    }

    #[test]
    fn shards_are_deterministic_in_range_and_differ_by_peer_and_round() {
        let a = batch_offsets(10_000, 64, 12, 5, 3, &[1; 32]);
        assert_eq!(a, batch_offsets(10_000, 64, 12, 5, 3, &[1; 32]));
        assert!(a.iter().all(|&o| o + 65 <= 10_000));
        assert_ne!(a, batch_offsets(10_000, 64, 12, 5, 3, &[2; 32]));
        assert_ne!(a, batch_offsets(10_000, 64, 12, 5, 4, &[1; 32]));
        assert_eq!(batch_offsets(10, 64, 2, 5, 3, &[1; 32]), vec![0, 0]);
    }
}
