//! Contributions to a training round: content-addressed blobs, their signed commitments, and the
//! deterministic aggregation every peer performs.
//!
//! A contribution's blob (an encoded update, see [`crate::compress`]) is addressed by its blake3
//! hash. Its [`Commitment`] — job, round, hash, size, author — is signed by the author (ed25519,
//! domain-separated) and gossiped; the blob itself is fetched peer to peer and checked against
//! the committed hash and size on receipt ([`verify_blob`]).
//!
//! [`aggregate`] averages the accepted updates in a canonical order (by author key), so every
//! peer that accepted the same set computes a bit-identical result whatever order the blobs
//! arrived in.

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{PeerKey, WireError, compress::SparseUpdate, decode_bounded, encode};

/// Largest signed commitment accepted from the wire, in bytes.
pub const MAX_COMMITMENT_BYTES: usize = 512;
/// Domain separation for commitment signatures.
const COMMITMENT_DOMAIN: &[u8] = b"loom/commitment/v1\0";

/// A blake3 content hash.
pub type BlobHash = [u8; 32];

/// The blake3 hash of a blob.
pub fn blob_hash(blob: &[u8]) -> BlobHash {
    *blake3::hash(blob).as_bytes()
}

/// What an author commits to before revealing its contribution.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Commitment {
    /// The job (hash of its manifest).
    pub job_id: [u8; 32],
    /// The round.
    pub round: u64,
    /// blake3 hash of the blob.
    pub blob_hash: BlobHash,
    /// Size of the blob in bytes.
    pub blob_len: u64,
    /// The author's ed25519 key.
    pub author: PeerKey,
}

/// A commitment as it travels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedCommitment {
    /// `encode(&Commitment)`.
    pub body: Vec<u8>,
    /// ed25519 signature over the domain tag and `body`.
    pub signature: Vec<u8>,
}

/// Why a commitment or blob was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ContributionRejected {
    /// Not decodable or over the size limit.
    #[error("undecodable commitment: {0}")]
    Wire(#[from] WireError),
    /// The author key is not a valid ed25519 key.
    #[error("commitment key is not a valid ed25519 key")]
    BadKey,
    /// The signature does not verify.
    #[error("commitment signature does not verify")]
    BadSignature,
    /// The blob is larger than committed or than allowed.
    #[error("blob of {size_bytes} bytes, committed {committed_bytes}, limit {limit_bytes}")]
    BlobSize {
        /// Size received.
        size_bytes: u64,
        /// Size committed.
        committed_bytes: u64,
        /// Largest accepted.
        limit_bytes: u64,
    },
    /// The blob does not hash to the committed hash.
    #[error("blob hash does not match its commitment")]
    BlobHash,
}

fn signing_bytes(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(COMMITMENT_DOMAIN.len() + body.len());
    out.extend_from_slice(COMMITMENT_DOMAIN);
    out.extend_from_slice(body);
    out
}

impl Commitment {
    /// Encodes and signs with `sign` (an ed25519 signer over the given bytes).
    pub fn seal(&self, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> SignedCommitment {
        let body = encode(self);
        let signature = sign(&signing_bytes(&body));
        SignedCommitment { body, signature }
    }
}

impl SignedCommitment {
    /// Wire bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes, bounds-checks and verifies a commitment received from the network.
    pub fn open(bytes: &[u8]) -> Result<Commitment, ContributionRejected> {
        let signed: SignedCommitment = decode_bounded(bytes, MAX_COMMITMENT_BYTES)?;
        signed.verify()
    }

    /// The commitment as its body claims it, bounds-checked, without checking the signature:
    /// for comparing commitments already verified ([`SignedCommitment::verify`]).
    pub fn claimed(&self) -> Result<Commitment, ContributionRejected> {
        Ok(decode_bounded(&self.body, MAX_COMMITMENT_BYTES)?)
    }

    /// Bounds-checks and verifies an already decoded commitment (e.g. one inside a larger
    /// message, whose own decoding was bounded).
    pub fn verify(&self) -> Result<Commitment, ContributionRejected> {
        let commitment = self.claimed()?;
        let key = VerifyingKey::from_bytes(&commitment.author)
            .map_err(|_| ContributionRejected::BadKey)?;
        let signature = Signature::from_slice(&self.signature)
            .map_err(|_| ContributionRejected::BadSignature)?;
        key.verify_strict(&signing_bytes(&self.body), &signature)
            .map_err(|_| ContributionRejected::BadSignature)?;
        Ok(commitment)
    }
}

/// Checks a fetched blob against its commitment and a size limit.
pub fn verify_blob(
    commitment: &Commitment,
    blob: &[u8],
    limit_bytes: u64,
) -> Result<(), ContributionRejected> {
    let size = blob.len() as u64;
    if size != commitment.blob_len || size > limit_bytes {
        return Err(ContributionRejected::BlobSize {
            size_bytes: size,
            committed_bytes: commitment.blob_len,
            limit_bytes,
        });
    }
    if blob_hash(blob) != commitment.blob_hash {
        return Err(ContributionRejected::BlobHash);
    }
    Ok(())
}

/// Averages `updates` (author key, decoded update) into a vector of length `len`, in canonical
/// order: sorted by author key, summed in f64 per coordinate, divided by the count, rounded to
/// f32 once. Updates of another length are skipped. Returns the average and the authors used,
/// in the order used.
pub fn aggregate(len: usize, updates: &[(PeerKey, &SparseUpdate)]) -> (Vec<f32>, Vec<PeerKey>) {
    let mut ordered: Vec<&(PeerKey, &SparseUpdate)> =
        updates.iter().filter(|(_, u)| u.len == len).collect();
    ordered.sort_by_key(|u| u.0);
    ordered.dedup_by(|a, b| a.0 == b.0);
    let mut sum = vec![0.0f64; len];
    for (_, update) in &ordered {
        for (&i, &v) in update.indices.iter().zip(&update.values) {
            if let Some(slot) = sum.get_mut(i as usize) {
                *slot += f64::from(v);
            }
        }
    }
    let count = ordered.len().max(1) as f64;
    let average = sum.into_iter().map(|s| (s / count) as f32).collect();
    (average, ordered.into_iter().map(|(k, _)| *k).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::{Codec, Sparsity, ValueFormat, compress};
    use ed25519_dalek::{Signer, SigningKey};
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn commitment(sk: &SigningKey, blob: &[u8]) -> Commitment {
        Commitment {
            job_id: [7; 32],
            round: 3,
            blob_hash: blob_hash(blob),
            blob_len: blob.len() as u64,
            author: sk.verifying_key().to_bytes(),
        }
    }

    #[test]
    fn a_signed_commitment_round_trips_and_a_forgery_does_not() {
        let sk = key(1);
        let c = commitment(&sk, b"blob");
        let sealed = c.seal(|m| sk.sign(m).to_bytes().to_vec()).to_bytes();
        assert_eq!(SignedCommitment::open(&sealed), Ok(c.clone()));
        let forged = c.seal(|m| key(2).sign(m).to_bytes().to_vec()).to_bytes();
        assert_eq!(
            SignedCommitment::open(&forged),
            Err(ContributionRejected::BadSignature)
        );
        assert!(SignedCommitment::open(&[0u8; MAX_COMMITMENT_BYTES + 1]).is_err());
    }

    #[test]
    fn a_corrupted_or_oversize_blob_is_rejected() {
        let blob = b"an encoded update".to_vec();
        let c = commitment(&key(1), &blob);
        assert_eq!(verify_blob(&c, &blob, 1 << 20), Ok(()));
        let mut corrupted = blob.clone();
        corrupted[0] ^= 1;
        assert_eq!(
            verify_blob(&c, &corrupted, 1 << 20),
            Err(ContributionRejected::BlobHash)
        );
        assert!(matches!(
            verify_blob(&c, &blob, 4),
            Err(ContributionRejected::BlobSize { .. })
        ));
        let mut longer = blob.clone();
        longer.push(0);
        assert!(matches!(
            verify_blob(&c, &longer, 1 << 20),
            Err(ContributionRejected::BlobSize { .. })
        ));
    }

    proptest! {
        #[test]
        fn aggregation_is_bit_identical_in_any_arrival_order(
            updates in prop::collection::vec(prop::collection::vec(-1.0f32..1.0, 32), 1..8),
            seed in any::<u64>(),
        ) {
            let codec = Codec { sparsity: Sparsity::TopK { ratio: 0.25 }, values: ValueFormat::Fp16 };
            let sparse: Vec<(PeerKey, SparseUpdate)> = updates
                .iter()
                .enumerate()
                .map(|(i, u)| {
                    let mut residual = vec![0.0; 32];
                    ([i as u8 + 1; 32], compress(u, &mut residual, codec).1)
                })
                .collect();
            let in_order: Vec<(PeerKey, &SparseUpdate)> = sparse.iter().map(|(k, u)| (*k, u)).collect();
            let mut shuffled = in_order.clone();
            // A deterministic shuffle driven by the seed.
            let mut state = seed | 1;
            for i in (1..shuffled.len()).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                shuffled.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let (a, authors_a) = aggregate(32, &in_order);
            let (b, authors_b) = aggregate(32, &shuffled);
            prop_assert_eq!(authors_a, authors_b);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(bits(&a), bits(&b));
        }
    }

    #[test]
    fn aggregation_averages_and_skips_duplicates_and_wrong_lengths() {
        let u = |len: usize, idx: Vec<u32>, vals: Vec<f32>| SparseUpdate {
            len,
            indices: idx,
            values: vals,
        };
        let a = u(3, vec![0, 2], vec![2.0, 4.0]);
        let b = u(3, vec![2], vec![2.0]);
        let wrong = u(4, vec![0], vec![100.0]);
        let (avg, authors) = aggregate(
            3,
            &[
                ([2; 32], &b),
                ([1; 32], &a),
                ([1; 32], &a),
                ([3; 32], &wrong),
            ],
        );
        assert_eq!(avg, vec![1.0, 0.0, 3.0]);
        assert_eq!(authors, vec![[1; 32], [2; 32]]);
    }
}
