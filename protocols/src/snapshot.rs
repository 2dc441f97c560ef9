//! Model snapshots: the global parameters of a job after a round together with the shared
//! optimizer state, as one self-describing, content-addressed blob.
//!
//! The same bytes are served to joining and diverged peers, written to disk as checkpoints, and
//! hashed (blake3) to give the round's model hash, so "same hash" means "same model and same
//! optimizer state, bit for bit".
//!
//! Layout (little endian): `"LSN1"`, job id (32), round (u64), kind (u8: 0 Nesterov, 1 AdamW),
//! optimizer step (u64), parameter count n (u64), then n f32 parameters followed by the state
//! vectors (Nesterov: one buffer of n; AdamW: m and v, n each).

use crate::{contribution::BlobHash, round::JobId};

const MAGIC: &[u8; 4] = b"LSN1";
const HEADER_BYTES: usize = 4 + 32 + 8 + 1 + 8 + 8;

/// The shared (outer) optimizer state every peer holds identically.
#[derive(Debug, Clone, PartialEq)]
pub enum OuterState {
    /// DiLoCo's Nesterov momentum buffer.
    Nesterov {
        /// Momentum buffer.
        buf: Vec<f32>,
    },
    /// The `sync` strategy's AdamW moments.
    AdamW {
        /// First moment.
        m: Vec<f32>,
        /// Second moment.
        v: Vec<f32>,
        /// Steps taken.
        step: u64,
    },
}

impl OuterState {
    fn tag(&self) -> u8 {
        match self {
            OuterState::Nesterov { .. } => 0,
            OuterState::AdamW { .. } => 1,
        }
    }
}

/// The state of a job after a round.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The job.
    pub job_id: JobId,
    /// The last round applied (0: the initial model).
    pub round: u64,
    /// Global parameters, canonical order.
    pub params: Vec<f32>,
    /// Shared optimizer state.
    pub outer: OuterState,
}

/// Why snapshot bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// Not a snapshot.
    #[error("not a model snapshot (bad magic or header)")]
    BadHeader,
    /// Another job's snapshot.
    #[error("snapshot of another job")]
    OtherJob,
    /// A parameter count other than the model's.
    #[error("snapshot has {got} parameters, the model has {expected}")]
    Length {
        /// In the snapshot.
        got: u64,
        /// The model's.
        expected: usize,
    },
    /// Size does not match the header.
    #[error("snapshot is {got} bytes, its header implies {expected}")]
    Size {
        /// Actual.
        got: usize,
        /// Implied.
        expected: usize,
    },
    /// A NaN or infinity.
    #[error("snapshot holds a non-finite value")]
    NonFinite,
    /// The hash is not the one asked for.
    #[error("snapshot hash does not match")]
    Hash,
}

impl Snapshot {
    /// Serializes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let n = self.params.len();
        let vectors = match &self.outer {
            OuterState::Nesterov { .. } => 2,
            OuterState::AdamW { .. } => 3,
        };
        let mut out = Vec::with_capacity(HEADER_BYTES + vectors * n * 4);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.job_id);
        out.extend_from_slice(&self.round.to_le_bytes());
        out.push(self.outer.tag());
        let step = match &self.outer {
            OuterState::AdamW { step, .. } => *step,
            OuterState::Nesterov { .. } => 0,
        };
        out.extend_from_slice(&step.to_le_bytes());
        out.extend_from_slice(&(n as u64).to_le_bytes());
        let mut put = |values: &[f32]| {
            for v in values {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
        put(&self.params);
        match &self.outer {
            OuterState::Nesterov { buf } => put(buf),
            OuterState::AdamW { m, v, .. } => {
                put(m);
                put(v);
            }
        }
        out
    }

    /// The model hash of this state (the blake3 hash of its bytes).
    pub fn hash(&self) -> BlobHash {
        crate::contribution::blob_hash(&self.to_bytes())
    }

    /// Parses and checks snapshot bytes for `job_id` and a model of `param_count` parameters.
    pub fn from_bytes(
        bytes: &[u8],
        job_id: &JobId,
        param_count: usize,
    ) -> Result<Self, SnapshotError> {
        if bytes.len() < HEADER_BYTES || &bytes[..4] != MAGIC {
            return Err(SnapshotError::BadHeader);
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        if &bytes[4..36] != job_id {
            return Err(SnapshotError::OtherJob);
        }
        let round = u64_at(36);
        let tag = bytes[44];
        let step = u64_at(45);
        let n = u64_at(53);
        if n != param_count as u64 {
            return Err(SnapshotError::Length {
                got: n,
                expected: param_count,
            });
        }
        let vectors = match tag {
            0 => 2,
            1 => 3,
            _ => return Err(SnapshotError::BadHeader),
        };
        let expected = HEADER_BYTES + vectors * param_count * 4;
        if bytes.len() != expected {
            return Err(SnapshotError::Size {
                got: bytes.len(),
                expected,
            });
        }
        let read = |index: usize| -> Result<Vec<f32>, SnapshotError> {
            let start = HEADER_BYTES + index * param_count * 4;
            let values: Vec<f32> = bytes[start..start + param_count * 4]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if values.iter().all(|v| v.is_finite()) {
                Ok(values)
            } else {
                Err(SnapshotError::NonFinite)
            }
        };
        let params = read(0)?;
        let outer = match tag {
            0 => OuterState::Nesterov { buf: read(1)? },
            _ => OuterState::AdamW {
                m: read(1)?,
                v: read(2)?,
                step,
            },
        };
        Ok(Snapshot {
            job_id: *job_id,
            round,
            params,
            outer,
        })
    }

    /// Parses bytes that must hash to `expected_hash`.
    pub fn from_verified_bytes(
        bytes: &[u8],
        expected_hash: &BlobHash,
        job_id: &JobId,
        param_count: usize,
    ) -> Result<Self, SnapshotError> {
        if crate::contribution::blob_hash(bytes) != *expected_hash {
            return Err(SnapshotError::Hash);
        }
        Self::from_bytes(bytes, job_id, param_count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(outer: OuterState) -> Snapshot {
        Snapshot {
            job_id: [4; 32],
            round: 9,
            params: vec![1.0, -2.5, 3.25],
            outer,
        }
    }

    #[test]
    fn snapshots_round_trip_bit_exactly() {
        for outer in [
            OuterState::Nesterov {
                buf: vec![0.5, 0.0, -1.0],
            },
            OuterState::AdamW {
                m: vec![0.1, 0.2, 0.3],
                v: vec![1.0, 2.0, 3.0],
                step: 17,
            },
        ] {
            let snapshot = sample(outer);
            let bytes = snapshot.to_bytes();
            let back =
                Snapshot::from_verified_bytes(&bytes, &snapshot.hash(), &[4; 32], 3).expect("ok");
            assert_eq!(back, snapshot);
        }
    }

    #[test]
    fn corrupt_truncated_or_foreign_snapshots_are_refused() {
        let snapshot = sample(OuterState::Nesterov { buf: vec![0.0; 3] });
        let bytes = snapshot.to_bytes();
        let hash = snapshot.hash();
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            Snapshot::from_verified_bytes(&flipped, &hash, &[4; 32], 3),
            Err(SnapshotError::Hash)
        );
        assert!(matches!(
            Snapshot::from_bytes(&bytes[..bytes.len() - 4], &[4; 32], 3),
            Err(SnapshotError::Size { .. })
        ));
        assert_eq!(
            Snapshot::from_bytes(&bytes, &[5; 32], 3),
            Err(SnapshotError::OtherJob)
        );
        assert!(matches!(
            Snapshot::from_bytes(&bytes, &[4; 32], 4),
            Err(SnapshotError::Length { .. })
        ));
        assert_eq!(
            Snapshot::from_bytes(b"nope", &[4; 32], 3),
            Err(SnapshotError::BadHeader)
        );
    }
}
