//! The verifier's screening of one round's contributions: which decoded updates are refused
//! before aggregation, and why.
//!
//! Every peer runs [`screen`] on the same inputs (the close's contributions, decoded from the
//! same bytes, sorted by author) with the same settings, and the arithmetic is plain `f64` in a
//! fixed order, so every peer refuses the same contributions and the models stay identical.
//! The checks, in order, each on the contributions the previous ones kept:
//!
//! 1. **non-finite**: a NaN or infinite value;
//! 2. **zero**: nothing sent, or only zeros (a free rider);
//! 3. **duplicate**: two contributions that are the same update (cosine at or above
//!    [`ScreeningConfig::duplicate_cosine`]). Commit-then-reveal keeps an honest close from ever
//!    holding a copy (a copier can only commit after the reveal, when it is too late), so both
//!    sides of a duplicate in a close are refused;
//! 4. **norm**: with at least [`ScreeningConfig::min_peers_for_statistics`] left, an update
//!    whose norm is more than [`ScreeningConfig::max_norm_ratio`] times the median norm, or less
//!    than the median divided by it (scaled updates);
//! 5. **direction**: with as many left, an update whose cosine with the sum of the others is
//!    below [`ScreeningConfig::min_cosine`] (random noise is near 0, a sign flip negative, while
//!    honest updates on different shards of the same task agree). The worst is refused first
//!    and the sums taken again without it, so an attacker never counts against an honest peer.
//!
//! The statistics (median norm, the others' sum) are taken over what the earlier checks kept,
//! so a minority of wild updates cannot move the yardstick the rest are measured with.

use std::fmt;

use crate::{PeerKey, compress::SparseUpdate};

/// Settings of the screening (the defaults are what the byzantine tests run with).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScreeningConfig {
    /// Largest ratio between an update's norm and the round's median norm (both ways).
    pub max_norm_ratio: f64,
    /// Smallest cosine between an update and the sum of the other updates.
    pub min_cosine: f64,
    /// Cosine at or above which two updates count as the same.
    pub duplicate_cosine: f64,
    /// Fewest contributions for the statistical checks (norm, direction) to run.
    pub min_peers_for_statistics: usize,
}

impl Default for ScreeningConfig {
    fn default() -> Self {
        Self {
            max_norm_ratio: 10.0,
            min_cosine: 0.05,
            duplicate_cosine: 0.9999,
            min_peers_for_statistics: 3,
        }
    }
}

/// Why a contribution was refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// It holds NaN or infinite values.
    NonFinite,
    /// It is empty or all zeros.
    Zero,
    /// It is the same update as another contributor's.
    Duplicate {
        /// The other contributor.
        of: PeerKey,
    },
    /// Its norm is far from the round's median.
    Norm {
        /// Its norm divided by the median norm.
        ratio: f64,
    },
    /// It points away from the other updates.
    Direction {
        /// Its cosine with the sum of the others.
        cosine: f64,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NonFinite => write!(f, "non-finite values"),
            Refusal::Zero => write!(f, "all-zero update (free rider)"),
            Refusal::Duplicate { of } => {
                write!(f, "duplicate of the update of {}", short_hex(of))
            }
            Refusal::Norm { ratio } => write!(f, "norm {ratio:.3}x the round's median"),
            Refusal::Direction { cosine } => {
                write!(
                    f,
                    "direction disagrees with the others (cosine {cosine:.3})"
                )
            }
        }
    }
}

/// The first 6 bytes of a key in hex, for reasons people read.
pub(crate) fn short_hex(key: &PeerKey) -> String {
    key[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// Dot product of two sparse updates (indices strictly increasing), in index order.
fn sparse_dot(a: &SparseUpdate, b: &SparseUpdate) -> f64 {
    let (mut i, mut j, mut dot) = (0, 0, 0.0f64);
    while i < a.indices.len() && j < b.indices.len() {
        match a.indices[i].cmp(&b.indices[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                dot += f64::from(a.values[i]) * f64::from(b.values[j]);
                i += 1;
                j += 1;
            }
        }
    }
    dot
}

fn norm(update: &SparseUpdate) -> f64 {
    sparse_dot(update, update).sqrt()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Each update's cosine with the sum of the other updates.
fn cosines_with_the_others(updates: &[(PeerKey, &SparseUpdate, f64)]) -> Vec<f64> {
    let len = updates.first().map(|u| u.1.len).unwrap_or(0);
    let mut sum = vec![0.0f64; len];
    for (_, update, _) in updates {
        for (&i, &v) in update.indices.iter().zip(&update.values) {
            if let Some(slot) = sum.get_mut(i as usize) {
                *slot += f64::from(v);
            }
        }
    }
    let sum_norm2: f64 = sum.iter().map(|v| v * v).sum();
    updates
        .iter()
        .map(|(_, update, own_norm)| {
            // The others' sum is `sum - update`: its dot with the update and its norm follow
            // from the update's own terms.
            let mut dot_with_sum = 0.0f64;
            for (&i, &v) in update.indices.iter().zip(&update.values) {
                dot_with_sum += f64::from(v) * sum.get(i as usize).copied().unwrap_or(0.0);
            }
            let own2 = own_norm * own_norm;
            let dot = dot_with_sum - own2;
            let others2 = (sum_norm2 - 2.0 * dot_with_sum + own2).max(0.0);
            if others2 == 0.0 {
                0.0
            } else {
                dot / (own_norm * others2.sqrt())
            }
        })
        .collect()
}

/// Each update's cosine with the sum of the other updates (for reports of the margin the
/// honest updates keep above [`ScreeningConfig::min_cosine`]).
pub fn cosines(updates: &[(PeerKey, &SparseUpdate)]) -> Vec<f64> {
    let with_norms: Vec<(PeerKey, &SparseUpdate, f64)> =
        updates.iter().map(|(k, u)| (*k, *u, norm(u))).collect();
    cosines_with_the_others(&with_norms)
}

/// The contributions to refuse among `updates` (any order; the result is sorted by author),
/// each with its reason. Updates are taken as they decode: the caller has already refused
/// those that do not decode or have the wrong length.
pub fn screen(
    updates: &[(PeerKey, &SparseUpdate)],
    config: &ScreeningConfig,
) -> Vec<(PeerKey, Refusal)> {
    let mut ordered: Vec<(PeerKey, &SparseUpdate)> = updates.to_vec();
    ordered.sort_by_key(|(k, _)| *k);
    ordered.dedup_by_key(|(k, _)| *k);
    let mut refused: Vec<(PeerKey, Refusal)> = Vec::new();
    let mut kept: Vec<(PeerKey, &SparseUpdate, f64)> = Vec::new();
    for (key, update) in ordered {
        if update.values.iter().any(|v| !v.is_finite()) {
            refused.push((key, Refusal::NonFinite));
            continue;
        }
        let n = norm(update);
        if n == 0.0 {
            refused.push((key, Refusal::Zero));
            continue;
        }
        kept.push((key, update, n));
    }
    // Duplicates: pairwise, both sides.
    let mut duplicate_of: Vec<Option<PeerKey>> = vec![None; kept.len()];
    for i in 0..kept.len() {
        for j in i + 1..kept.len() {
            let cosine = sparse_dot(kept[i].1, kept[j].1) / (kept[i].2 * kept[j].2);
            if cosine >= config.duplicate_cosine {
                duplicate_of[i].get_or_insert(kept[j].0);
                duplicate_of[j].get_or_insert(kept[i].0);
            }
        }
    }
    let mut survivors = Vec::with_capacity(kept.len());
    for (entry, duplicate) in kept.into_iter().zip(duplicate_of) {
        match duplicate {
            Some(of) => refused.push((entry.0, Refusal::Duplicate { of })),
            None => survivors.push(entry),
        }
    }
    if survivors.len() >= config.min_peers_for_statistics.max(2) {
        let median_norm = median(survivors.iter().map(|s| s.2).collect());
        let mut in_range = Vec::with_capacity(survivors.len());
        for entry in survivors {
            let ratio = entry.2 / median_norm;
            if ratio > config.max_norm_ratio || ratio < 1.0 / config.max_norm_ratio {
                refused.push((entry.0, Refusal::Norm { ratio }));
            } else {
                in_range.push(entry);
            }
        }
        survivors = in_range;
    }
    // Direction, one at a time: the update furthest from the others' sum goes first, then the
    // sums are taken again without it, so an attacker's update never counts against an honest
    // one.
    while survivors.len() >= config.min_peers_for_statistics.max(2) {
        let cosines = cosines_with_the_others(&survivors);
        let Some((worst, cosine)) = cosines
            .iter()
            .copied()
            .enumerate()
            .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        else {
            break;
        };
        if cosine >= config.min_cosine {
            break;
        }
        let (key, _, _) = survivors.remove(worst);
        refused.push((key, Refusal::Direction { cosine }));
    }
    refused.sort_by_key(|(k, _)| *k);
    refused
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse(len: usize, pairs: &[(u32, f32)]) -> SparseUpdate {
        SparseUpdate {
            len,
            indices: pairs.iter().map(|p| p.0).collect(),
            values: pairs.iter().map(|p| p.1).collect(),
        }
    }

    /// Honest updates: a shared direction plus a little per-peer variation.
    fn honest(seed: u32) -> SparseUpdate {
        let len = 64;
        let pairs: Vec<(u32, f32)> = (0..len as u32)
            .filter(|i| !(i + seed).is_multiple_of(3))
            .map(|i| {
                let base = if i % 2 == 0 { 1.0 } else { -0.5 };
                let wobble = ((i * 7 + seed * 13) % 11) as f32 / 40.0;
                (i, base + wobble)
            })
            .collect();
        sparse(len, &pairs)
    }

    fn key(i: u8) -> PeerKey {
        [i; 32]
    }

    fn run(updates: &[SparseUpdate]) -> Vec<(PeerKey, Refusal)> {
        let refs: Vec<(PeerKey, &SparseUpdate)> = updates
            .iter()
            .enumerate()
            .map(|(i, u)| (key(i as u8 + 1), u))
            .collect();
        screen(&refs, &ScreeningConfig::default())
    }

    #[test]
    fn honest_updates_pass() {
        let updates: Vec<SparseUpdate> = (0..5).map(honest).collect();
        assert!(run(&updates).is_empty());
    }

    #[test]
    fn each_misbehaviour_is_refused_with_its_reason_and_the_honest_kept() {
        let mut updates: Vec<SparseUpdate> = (0..4).map(honest).collect();
        let scaled = {
            let mut u = honest(9);
            u.values.iter_mut().for_each(|v| *v *= 100.0);
            u
        };
        let flipped = {
            let mut u = honest(10);
            u.values.iter_mut().for_each(|v| *v = -*v);
            u
        };
        let noise = {
            let mut u = honest(11);
            let mut x = 12345u32;
            u.values.iter_mut().for_each(|v| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                *v = ((x >> 16) % 2000) as f32 / 1000.0 - 1.0;
            });
            u
        };
        let zero = sparse(64, &[(3, 0.0)]);
        let nan = sparse(64, &[(3, f32::NAN)]);
        updates.extend([scaled, flipped, noise, zero, nan]);
        let refused = run(&updates);
        let reasons: Vec<(u8, String)> =
            refused.iter().map(|(k, r)| (k[0], r.to_string())).collect();
        assert_eq!(refused.len(), 5, "{reasons:?}");
        assert!(
            matches!(refused[0], (k, Refusal::Norm { .. }) if k == key(5)),
            "{reasons:?}"
        );
        assert!(
            matches!(refused[1], (k, Refusal::Direction { cosine }) if k == key(6) && cosine < -0.5)
        );
        assert!(
            matches!(refused[2], (k, Refusal::Direction { cosine }) if k == key(7) && cosine.abs() < 0.3)
        );
        assert_eq!(refused[3], (key(8), Refusal::Zero));
        assert_eq!(refused[4], (key(9), Refusal::NonFinite));
    }

    #[test]
    fn both_sides_of_a_duplicate_are_refused() {
        let updates = vec![honest(0), honest(1), honest(2), honest(1)];
        let refused = run(&updates);
        assert_eq!(
            refused,
            vec![
                (key(2), Refusal::Duplicate { of: key(4) }),
                (key(4), Refusal::Duplicate { of: key(2) })
            ]
        );
    }

    #[test]
    fn statistics_need_enough_peers_and_the_result_ignores_input_order() {
        let flipped = {
            let mut u = honest(1);
            u.values.iter_mut().for_each(|v| *v = -*v);
            u
        };
        // Two updates: no yardstick, nothing refused on statistics.
        assert!(run(&[honest(0), flipped.clone()]).is_empty());
        let a = honest(0);
        let b = honest(2);
        let forward = screen(
            &[(key(1), &a), (key(2), &b), (key(3), &flipped)],
            &ScreeningConfig::default(),
        );
        let backward = screen(
            &[(key(3), &flipped), (key(2), &b), (key(1), &a)],
            &ScreeningConfig::default(),
        );
        assert_eq!(forward, backward);
        assert_eq!(forward.len(), 1);
    }
}
