//! Compression of model updates: top-k sparsification with error feedback, value quantization
//! (fp32, fp16, int8) and a compact, bounded wire encoding.
//!
//! A peer's update (a gradient or a DiLoCo pseudo-gradient, flattened to `f32`) is added to the
//! residual it kept from last time; the `k` coordinates of largest magnitude are sent, quantized,
//! and everything not sent (the other coordinates, and the quantization error of those sent) goes
//! back into the residual. Over many rounds the sum of what was sent plus the residual equals the
//! sum of the updates: nothing is lost, only delayed.
//!
//! Wire format of an [`EncodedUpdate`] (all integers LEB128 varints unless noted):
//!
//! ```text
//! magic "LMU1" | values: u8 (0 fp32, 1 fp16, 2 int8) | dense: u8 (0|1) | len | k
//! | scale: f32 LE (int8 only)
//! | indices: k deltas (sparse only; first is the index, then differences - 1, strictly increasing)
//! | values: k × (4 | 2 | 1) bytes LE
//! ```
//!
//! The decoder is bounded: it refuses inputs longer than the caller's limit, vectors longer than
//! `max_len`, `k > len`, out-of-range or non-increasing indices, non-finite values and trailing
//! bytes, and never allocates more than the input justifies.

use half::f16;

/// How values are carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueFormat {
    /// 4 bytes, exact.
    Fp32,
    /// 2 bytes, IEEE half precision (relative error ≤ 2⁻¹¹ in the normal range).
    Fp16,
    /// 1 byte, symmetric with one scale per update (absolute error ≤ scale / 2).
    Int8,
}

impl ValueFormat {
    fn tag(self) -> u8 {
        match self {
            ValueFormat::Fp32 => 0,
            ValueFormat::Fp16 => 1,
            ValueFormat::Int8 => 2,
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        match tag {
            0 => Some(ValueFormat::Fp32),
            1 => Some(ValueFormat::Fp16),
            2 => Some(ValueFormat::Int8),
            _ => None,
        }
    }

    fn width(self) -> usize {
        match self {
            ValueFormat::Fp32 => 4,
            ValueFormat::Fp16 => 2,
            ValueFormat::Int8 => 1,
        }
    }
}

/// Which coordinates are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sparsity {
    /// Every coordinate.
    Dense,
    /// The `ratio` fraction (0 < ratio ≤ 1) of largest magnitude, at least one.
    TopK {
        /// Fraction of coordinates sent.
        ratio: f32,
    },
}

/// A compression configuration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Codec {
    /// Which coordinates.
    pub sparsity: Sparsity,
    /// How values are carried.
    pub values: ValueFormat,
}

/// Why an encoded update was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// Longer than the caller's limit.
    #[error("update of {size_bytes} bytes exceeds the limit of {limit_bytes}")]
    TooLarge {
        /// Input size.
        size_bytes: usize,
        /// Limit.
        limit_bytes: usize,
    },
    /// Does not start with the magic bytes.
    #[error("not an encoded update (bad magic)")]
    BadMagic,
    /// Unknown value format or dense flag.
    #[error("unknown value format or flag")]
    BadHeader,
    /// The vector is longer than allowed.
    #[error("update of {len} coordinates exceeds the limit of {max_len}")]
    TooLong {
        /// Declared length.
        len: u64,
        /// Limit.
        max_len: usize,
    },
    /// `k` larger than the length, or a dense update with `k != len`.
    #[error("inconsistent count of sent coordinates")]
    BadCount,
    /// An index out of range or not increasing.
    #[error("bad coordinate index")]
    BadIndex,
    /// A NaN or infinite value or scale.
    #[error("non-finite value")]
    NonFinite,
    /// The input ended early.
    #[error("truncated update")]
    Truncated,
    /// Bytes after the last value.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

/// An update as sent: which coordinates, with which (dequantized) values.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseUpdate {
    /// Length of the full vector.
    pub len: usize,
    /// Sent coordinates, strictly increasing.
    pub indices: Vec<u32>,
    /// Their values.
    pub values: Vec<f32>,
}

impl SparseUpdate {
    /// Adds `weight × self` into `dense` (which must have length `len`).
    pub fn add_into(&self, dense: &mut [f32], weight: f32) {
        for (&i, &v) in self.indices.iter().zip(&self.values) {
            if let Some(slot) = dense.get_mut(i as usize) {
                *slot += weight * v;
            }
        }
    }

    /// The full vector.
    pub fn to_dense(&self) -> Vec<f32> {
        let mut dense = vec![0.0; self.len];
        self.add_into(&mut dense, 1.0);
        dense
    }
}

/// Compresses `update` with error feedback: `residual` (same length, zeros at first) is added in
/// and then replaced by what was not sent. Returns the wire bytes and what the receiver decodes.
///
/// Panics never; a length mismatch is a programming error reported by `debug_assert`.
pub fn compress(update: &[f32], residual: &mut [f32], codec: Codec) -> (Vec<u8>, SparseUpdate) {
    debug_assert_eq!(update.len(), residual.len());
    let len = update.len().min(residual.len());
    // Accumulate into the residual: it now holds everything owed.
    for (r, &u) in residual.iter_mut().zip(update) {
        *r += if u.is_finite() { u } else { 0.0 };
    }
    let indices: Vec<u32> = match codec.sparsity {
        Sparsity::Dense => (0..len as u32).collect(),
        Sparsity::TopK { ratio } => top_k_indices(&residual[..len], k_for(len, ratio)),
    };
    let raw: Vec<f32> = indices.iter().map(|&i| residual[i as usize]).collect();
    let scale = int8_scale(&raw);
    let sent: Vec<f32> = raw
        .iter()
        .map(|&v| quantize_roundtrip(v, codec.values, scale))
        .collect();
    // What was sent leaves the residual; its quantization error stays.
    for (&i, &v) in indices.iter().zip(&sent) {
        residual[i as usize] -= v;
    }
    let update = SparseUpdate {
        len,
        indices,
        values: sent,
    };
    let bytes = encode(&update, codec, scale);
    (bytes, update)
}

/// How many coordinates top-k sends for a vector of `len` at `ratio`.
pub fn k_for(len: usize, ratio: f32) -> usize {
    if len == 0 {
        return 0;
    }
    let ratio = if ratio.is_finite() {
        ratio.clamp(0.0, 1.0)
    } else {
        1.0
    };
    ((len as f64 * f64::from(ratio)).ceil() as usize).clamp(1, len)
}

/// Indices of the `k` entries of largest magnitude, ascending (ties broken by lower index).
fn top_k_indices(values: &[f32], k: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..values.len() as u32).collect();
    if k < order.len() {
        let by_magnitude = |a: &u32, b: &u32| {
            values[*b as usize]
                .abs()
                .total_cmp(&values[*a as usize].abs())
                .then(a.cmp(b))
        };
        order.select_nth_unstable_by(k, by_magnitude);
        order.truncate(k);
    }
    order.sort_unstable();
    order
}

fn int8_scale(values: &[f32]) -> f32 {
    let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if max > 0.0 { max / 127.0 } else { 1.0 }
}

fn quantize_roundtrip(v: f32, format: ValueFormat, scale: f32) -> f32 {
    match format {
        ValueFormat::Fp32 => v,
        ValueFormat::Fp16 => to_f16(v).to_f32(),
        ValueFormat::Int8 => f32::from(quantize_int8(v, scale)) * scale,
    }
}

/// Half precision, saturating at ±65504 instead of overflowing to infinity (the excess stays in
/// the residual and is sent later).
fn to_f16(v: f32) -> f16 {
    f16::from_f32(v.clamp(f32::from(f16::MIN), f32::from(f16::MAX)))
}

fn quantize_int8(v: f32, scale: f32) -> i8 {
    (v / scale).round().clamp(-127.0, 127.0) as i8
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

const MAGIC: &[u8; 4] = b"LMU1";

fn encode(update: &SparseUpdate, codec: Codec, scale: f32) -> Vec<u8> {
    let dense = codec.sparsity == Sparsity::Dense;
    let k = update.indices.len();
    let mut out = Vec::with_capacity(16 + k * (codec.values.width() + if dense { 0 } else { 2 }));
    out.extend_from_slice(MAGIC);
    out.push(codec.values.tag());
    out.push(u8::from(dense));
    put_varint(&mut out, update.len as u64);
    put_varint(&mut out, k as u64);
    if codec.values == ValueFormat::Int8 {
        out.extend_from_slice(&scale.to_le_bytes());
    }
    if !dense {
        let mut previous: Option<u32> = None;
        for &i in &update.indices {
            let delta = match previous {
                None => u64::from(i),
                Some(p) => u64::from(i - p - 1),
            };
            put_varint(&mut out, delta);
            previous = Some(i);
        }
    }
    for &v in &update.values {
        match codec.values {
            ValueFormat::Fp32 => out.extend_from_slice(&v.to_le_bytes()),
            ValueFormat::Fp16 => out.extend_from_slice(&to_f16(v).to_le_bytes()),
            ValueFormat::Int8 => out.push(quantize_int8(v, scale) as u8),
        }
    }
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.checked_add(n).ok_or(DecodeError::Truncated)?;
        let slice = self.bytes.get(self.at..end).ok_or(DecodeError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(DecodeError::BadHeader)
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.at
    }
}

/// Decodes an update received from the network. `limit_bytes` bounds the input, `max_len` the
/// vector (the model's parameter count).
pub fn decode(
    bytes: &[u8],
    limit_bytes: usize,
    max_len: usize,
) -> Result<(SparseUpdate, Codec), DecodeError> {
    if bytes.len() > limit_bytes {
        return Err(DecodeError::TooLarge {
            size_bytes: bytes.len(),
            limit_bytes,
        });
    }
    let mut r = Reader { bytes, at: 0 };
    if r.take(4).map_err(|_| DecodeError::BadMagic)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let values = ValueFormat::from_tag(r.byte()?).ok_or(DecodeError::BadHeader)?;
    let dense = match r.byte()? {
        0 => false,
        1 => true,
        _ => return Err(DecodeError::BadHeader),
    };
    let len = r.varint()?;
    if len > max_len as u64 || len > u64::from(u32::MAX) {
        return Err(DecodeError::TooLong { len, max_len });
    }
    let len = len as usize;
    let k = r.varint()?;
    if k > len as u64 || (dense && k != len as u64) {
        return Err(DecodeError::BadCount);
    }
    let k = k as usize;
    // Every sent coordinate needs at least its value bytes (and one index byte if sparse):
    // refuse before allocating for a `k` the input cannot hold.
    let per_entry = values.width() + usize::from(!dense);
    if k.saturating_mul(per_entry) > r.remaining() {
        return Err(DecodeError::Truncated);
    }
    let scale = if values == ValueFormat::Int8 {
        let s = f32::from_le_bytes(r.take(4)?.try_into().map_err(|_| DecodeError::Truncated)?);
        if !s.is_finite() || s <= 0.0 {
            return Err(DecodeError::NonFinite);
        }
        s
    } else {
        1.0
    };
    let indices: Vec<u32> = if dense {
        (0..len as u32).collect()
    } else {
        let mut indices = Vec::with_capacity(k);
        let mut previous: Option<u64> = None;
        for _ in 0..k {
            let delta = r.varint()?;
            let index = match previous {
                None => delta,
                Some(p) => p
                    .checked_add(delta)
                    .and_then(|x| x.checked_add(1))
                    .ok_or(DecodeError::BadIndex)?,
            };
            if index >= len as u64 {
                return Err(DecodeError::BadIndex);
            }
            indices.push(index as u32);
            previous = Some(index);
        }
        indices
    };
    let mut decoded = Vec::with_capacity(k);
    for _ in 0..k {
        let v = match values {
            ValueFormat::Fp32 => {
                f32::from_le_bytes(r.take(4)?.try_into().map_err(|_| DecodeError::Truncated)?)
            }
            ValueFormat::Fp16 => {
                f16::from_le_bytes(r.take(2)?.try_into().map_err(|_| DecodeError::Truncated)?)
                    .to_f32()
            }
            ValueFormat::Int8 => f32::from(r.byte()? as i8) * scale,
        };
        if !v.is_finite() {
            return Err(DecodeError::NonFinite);
        }
        decoded.push(v);
    }
    if r.remaining() != 0 {
        return Err(DecodeError::Trailing(r.remaining()));
    }
    let sparsity = if dense {
        Sparsity::Dense
    } else {
        Sparsity::TopK {
            ratio: if len == 0 { 1.0 } else { k as f32 / len as f32 },
        }
    };
    Ok((
        SparseUpdate {
            len,
            indices,
            values: decoded,
        },
        Codec { sparsity, values },
    ))
}

/// Bytes a dense fp32 exchange of `len` coordinates takes (the baseline compression is judged by).
pub fn dense_fp32_bytes(len: usize) -> usize {
    len * 4
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FORMATS: [ValueFormat; 3] = [ValueFormat::Fp32, ValueFormat::Fp16, ValueFormat::Int8];

    fn vector() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(-1.0e3f32..1.0e3f32, 1..400)
    }

    fn codec() -> impl Strategy<Value = Codec> {
        (
            prop_oneof![
                Just(Sparsity::Dense),
                (0.001f32..1.0f32).prop_map(|ratio| Sparsity::TopK { ratio })
            ],
            prop::sample::select(FORMATS.to_vec()),
        )
            .prop_map(|(sparsity, values)| Codec { sparsity, values })
    }

    /// The largest error the value format allows for `v` given the update's int8 `scale`.
    fn bound(v: f32, format: ValueFormat, scale: f32) -> f32 {
        match format {
            ValueFormat::Fp32 => 0.0,
            ValueFormat::Fp16 => v.abs() * 2f32.powi(-11) + 6.0e-8,
            // Half a step, plus f32 rounding of `q × scale` at the value's magnitude.
            ValueFormat::Int8 => scale / 2.0 + (scale + v.abs()) * 4.0 * f32::EPSILON,
        }
    }

    proptest! {
        #[test]
        fn decode_of_encode_is_within_the_quantization_bound(x in vector(), codec in codec()) {
            let mut residual = vec![0.0; x.len()];
            let (bytes, sent) = compress(&x, &mut residual, codec);
            let (decoded, decoded_codec) = decode(&bytes, usize::MAX, x.len()).expect("decodes");
            prop_assert_eq!(decoded_codec.values, codec.values);
            prop_assert_eq!(&decoded, &sent);
            let k = sent.indices.len();
            prop_assert_eq!(k, match codec.sparsity {
                Sparsity::Dense => x.len(),
                Sparsity::TopK { ratio } => k_for(x.len(), ratio),
            });
            let raw: Vec<f32> = sent.indices.iter().map(|&i| x[i as usize]).collect();
            let scale = int8_scale(&raw);
            for (&i, &v) in sent.indices.iter().zip(&decoded.values) {
                let original = x[i as usize];
                prop_assert!((v - original).abs() <= bound(original, codec.values, scale),
                    "coordinate {i}: sent {v}, was {original}");
            }
        }

        #[test]
        fn error_feedback_keeps_the_accumulated_sum(
            steps in prop::collection::vec(prop::collection::vec(-10.0f32..10.0, 64), 1..12),
            codec in codec(),
        ) {
            let mut residual = vec![0.0f32; 64];
            let mut sent_sum = vec![0.0f64; 64];
            let mut true_sum = vec![0.0f64; 64];
            for step in &steps {
                let (_, sent) = compress(step, &mut residual, codec);
                for (i, v) in sent.to_dense().iter().enumerate() {
                    sent_sum[i] += f64::from(*v);
                }
                for (i, v) in step.iter().enumerate() {
                    true_sum[i] += f64::from(*v);
                }
            }
            for i in 0..64 {
                let reconstructed = sent_sum[i] + f64::from(residual[i]);
                prop_assert!((reconstructed - true_sum[i]).abs() <= 1e-3 * (1.0 + true_sum[i].abs()),
                    "coordinate {i}: sent + residual = {reconstructed}, sum of updates = {}", true_sum[i]);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, 1 << 16, 1 << 20);
        }

        #[test]
        fn a_corrupted_update_is_refused_or_stays_in_bounds(
            x in vector(), codec in codec(), at in any::<prop::sample::Index>(), flip in 1u8..=255,
        ) {
            let mut residual = vec![0.0; x.len()];
            let (mut bytes, _) = compress(&x, &mut residual, codec);
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            if let Ok((update, _)) = decode(&bytes, usize::MAX, x.len()) {
                prop_assert!(update.len <= x.len());
                prop_assert!(update.indices.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(update.indices.iter().all(|&i| (i as usize) < update.len));
                prop_assert!(update.values.iter().all(|v| v.is_finite()));
            }
        }
    }

    #[test]
    fn fp16_saturates_and_keeps_the_excess_in_the_residual() {
        let mut residual = [0.0f32; 1];
        let codec = Codec {
            sparsity: Sparsity::Dense,
            values: ValueFormat::Fp16,
        };
        let (bytes, sent) = compress(&[100_000.0], &mut residual, codec);
        assert_eq!(sent.values, vec![65504.0]);
        assert_eq!(residual, [100_000.0 - 65504.0]);
        assert!(decode(&bytes, usize::MAX, 1).is_ok());
    }

    #[test]
    fn top_k_sends_the_largest_magnitudes_in_index_order() {
        let x = [0.1, -5.0, 0.0, 3.0, -0.2, 4.0];
        let mut residual = [0.0; 6];
        let codec = Codec {
            sparsity: Sparsity::TopK { ratio: 0.5 },
            values: ValueFormat::Fp32,
        };
        let (_, sent) = compress(&x, &mut residual, codec);
        assert_eq!(sent.indices, vec![1, 3, 5]);
        assert_eq!(sent.values, vec![-5.0, 3.0, 4.0]);
        assert_eq!(residual, [0.1, 0.0, 0.0, 0.0, -0.2, 0.0]);
    }

    #[test]
    fn one_percent_top_k_with_int8_is_two_orders_smaller_than_dense_fp32() {
        let n = 100_000;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1000) as f32 - 500.0).collect();
        let mut residual = vec![0.0; n];
        let codec = Codec {
            sparsity: Sparsity::TopK { ratio: 0.01 },
            values: ValueFormat::Int8,
        };
        let (bytes, _) = compress(&x, &mut residual, codec);
        let ratio = dense_fp32_bytes(n) as f64 / bytes.len() as f64;
        assert!(ratio > 100.0, "only {ratio:.1}x smaller");
    }

    #[test]
    fn oversize_and_overlong_updates_are_refused_before_decoding() {
        let mut residual = vec![0.0; 10];
        let codec = Codec {
            sparsity: Sparsity::Dense,
            values: ValueFormat::Fp32,
        };
        let (bytes, _) = compress(&[1.0; 10], &mut residual, codec);
        assert!(matches!(
            decode(&bytes, 8, 10),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(matches!(
            decode(&bytes, usize::MAX, 9),
            Err(DecodeError::TooLong { .. })
        ));
        // A header claiming a billion sent coordinates in a few bytes is refused without
        // allocating for them.
        let mut forged = MAGIC.to_vec();
        forged.extend_from_slice(&[0, 0]);
        put_varint(&mut forged, 1 << 30);
        put_varint(&mut forged, 1 << 30);
        assert_eq!(
            decode(&forged, usize::MAX, 1 << 31),
            Err(DecodeError::Truncated)
        );
    }
}
