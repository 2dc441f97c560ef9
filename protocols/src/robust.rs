//! Robust aggregation and the numeric checks a verifier makes on contributions.
//!
//! - [`trimmed_mean`] and [`coordinate_median`] aggregate updates coordinate by coordinate so
//!   that a minority of wild values (noise, a sign flip, an update scaled ×100) cannot drag the
//!   result. Both sort each coordinate's values, so the result does not depend on arrival order
//!   and is bit-identical on every peer.
//! - [`cosine_on_support`] compares a submitted update with the verifier's recomputation on the
//!   coordinates that were transmitted, which tolerates CPU/GPU float differences while catching
//!   a different or forged update.
//! - [`l2_norm`] lets a verifier compare an update's size with the others'.

use crate::compress::SparseUpdate;

fn column(updates: &[&SparseUpdate], len: usize) -> Vec<Vec<f32>> {
    let mut columns = vec![Vec::with_capacity(updates.len()); len];
    for update in updates.iter().filter(|u| u.len == len) {
        let mut dense = vec![0.0f32; len];
        update.add_into(&mut dense, 1.0);
        for (col, v) in columns.iter_mut().zip(dense) {
            col.push(v);
        }
    }
    columns
}

/// Coordinate-wise mean after dropping the `trim` largest and `trim` smallest values of each
/// coordinate (unsent coordinates count as zero). Falls back to the median when `2·trim` would
/// leave nothing. Updates of another length are skipped.
pub fn trimmed_mean(len: usize, updates: &[&SparseUpdate], trim: usize) -> Vec<f32> {
    column(updates, len)
        .into_iter()
        .map(|mut values| {
            values.sort_by(f32::total_cmp);
            let n = values.len();
            if n == 0 {
                return 0.0;
            }
            if 2 * trim >= n {
                return median_sorted(&values);
            }
            let kept = &values[trim..n - trim];
            (kept.iter().map(|&v| f64::from(v)).sum::<f64>() / kept.len() as f64) as f32
        })
        .collect()
}

/// Coordinate-wise median (the mean of the two middle values for an even count).
pub fn coordinate_median(len: usize, updates: &[&SparseUpdate]) -> Vec<f32> {
    column(updates, len)
        .into_iter()
        .map(|mut values| {
            values.sort_by(f32::total_cmp);
            median_sorted(&values)
        })
        .collect()
}

fn median_sorted(values: &[f32]) -> f32 {
    let n = values.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => values[n / 2],
        _ => ((f64::from(values[n / 2 - 1]) + f64::from(values[n / 2])) / 2.0) as f32,
    }
}

/// Cosine similarity between the submitted update and `recomputed` (dense), over the submitted
/// update's coordinates only. 0 when either side is all zeros there.
pub fn cosine_on_support(submitted: &SparseUpdate, recomputed: &[f32]) -> f64 {
    let (mut dot, mut a2, mut b2) = (0.0f64, 0.0f64, 0.0f64);
    for (&i, &a) in submitted.indices.iter().zip(&submitted.values) {
        let b = f64::from(recomputed.get(i as usize).copied().unwrap_or(0.0));
        let a = f64::from(a);
        dot += a * b;
        a2 += a * a;
        b2 += b * b;
    }
    if a2 == 0.0 || b2 == 0.0 {
        0.0
    } else {
        dot / (a2.sqrt() * b2.sqrt())
    }
}

/// Euclidean norm of the transmitted values.
pub fn l2_norm(update: &SparseUpdate) -> f64 {
    update
        .values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dense(values: Vec<f32>) -> SparseUpdate {
        SparseUpdate {
            len: values.len(),
            indices: (0..values.len() as u32).collect(),
            values,
        }
    }

    #[test]
    fn a_minority_of_wild_updates_does_not_move_robust_aggregates() {
        let honest = [
            dense(vec![1.0, -1.0]),
            dense(vec![1.1, -0.9]),
            dense(vec![0.9, -1.1]),
        ];
        let scaled = dense(vec![100.0, -100.0]);
        let flipped = dense(vec![-1.0, 1.0]);
        let all: Vec<&SparseUpdate> = honest.iter().chain([&scaled, &flipped]).collect();
        let median = coordinate_median(2, &all);
        assert_eq!(median, vec![1.0, -1.0]);
        let trimmed = trimmed_mean(2, &all, 1);
        assert!((trimmed[0] - 1.0).abs() < 1e-6 && (trimmed[1] + 1.0).abs() < 1e-6);
        // A plain mean would have been dragged to ~20.4.
        let mean: f32 = all.iter().map(|u| u.values[0]).sum::<f32>() / 5.0;
        assert!(mean > 20.0);
    }

    #[test]
    fn cosine_tolerates_float_noise_and_catches_a_forgery() {
        let submitted = SparseUpdate {
            len: 4,
            indices: vec![0, 2],
            values: vec![0.5, -0.25],
        };
        let recomputed = [0.5001, 9.0, -0.2499, 9.0];
        assert!(cosine_on_support(&submitted, &recomputed) > 0.999);
        let flipped = [-0.5, 0.0, 0.25, 0.0];
        assert!(cosine_on_support(&submitted, &flipped) < -0.99);
        assert_eq!(cosine_on_support(&submitted, &[0.0; 4]), 0.0);
        assert!((l2_norm(&submitted) - (0.3125f64).sqrt()).abs() < 1e-12);
    }

    proptest! {
        #[test]
        fn robust_aggregates_do_not_depend_on_arrival_order(
            rows in prop::collection::vec(prop::collection::vec(-5.0f32..5.0, 6), 1..9),
            rotate in 0usize..9,
        ) {
            let updates: Vec<SparseUpdate> = rows.into_iter().map(dense).collect();
            let refs: Vec<&SparseUpdate> = updates.iter().collect();
            let mut rotated = refs.clone();
            let k = rotate % rotated.len();
            rotated.rotate_left(k);
            rotated.reverse();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            prop_assert_eq!(bits(coordinate_median(6, &refs)), bits(coordinate_median(6, &rotated)));
            prop_assert_eq!(bits(trimmed_mean(6, &refs, 1)), bits(trimmed_mean(6, &rotated, 1)));
        }
    }
}
