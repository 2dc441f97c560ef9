//! Private fleets: enrollment tokens signed by a fleet key, and the check every member runs on
//! the peers it meets.
//!
//! A fleet is an ed25519 key held by its owner. Enrolling a peer signs
//! (fleet, peer, expiry) with that key; the token is the peer's proof of membership, shown to
//! every peer it connects to. A member accepts a remote peer only when the remote's token is
//! signed by the fleet key, names the remote's own key (the key its connection authenticated),
//! has not expired, and the peer has not been revoked on the ledger. Tokens are bounded on the
//! wire and carry a domain tag so they cannot be confused with any other signature.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{PeerKey, WireError, decode_bounded, encode};

const TOKEN_DOMAIN: &[u8] = b"loom/fleet-enrollment/v1\0";
/// Largest encoded token, in bytes.
pub const MAX_TOKEN_BYTES: usize = 256;

/// A fleet's enrollment of one peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentToken {
    /// The fleet's public key.
    pub fleet: PeerKey,
    /// The enrolled peer's key.
    pub peer: PeerKey,
    /// Expiry (unix ms); 0 never expires.
    pub expires_unix_ms: u64,
    /// The fleet key's signature.
    pub signature: Vec<u8>,
}

/// Why a token is not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FleetError {
    /// It does not decode.
    #[error("enrollment token does not decode: {0}")]
    Decode(#[from] WireError),
    /// Another fleet's token.
    #[error("enrollment token is for another fleet")]
    WrongFleet,
    /// It names another peer than the one presenting it.
    #[error("enrollment token names another peer")]
    WrongPeer,
    /// The signature does not verify.
    #[error("enrollment token signature does not verify")]
    BadSignature,
    /// Past its expiry.
    #[error("enrollment token expired")]
    Expired,
    /// The peer was revoked.
    #[error("peer was revoked from the fleet")]
    Revoked,
}

fn signing_bytes(fleet: &PeerKey, peer: &PeerKey, expires_unix_ms: u64) -> Vec<u8> {
    let mut out = TOKEN_DOMAIN.to_vec();
    out.extend_from_slice(fleet);
    out.extend_from_slice(peer);
    out.extend_from_slice(&expires_unix_ms.to_le_bytes());
    out
}

impl EnrollmentToken {
    /// Signs an enrollment of `peer` with the fleet key.
    pub fn issue(fleet_key: &SigningKey, peer: PeerKey, expires_unix_ms: u64) -> Self {
        let fleet = fleet_key.verifying_key().to_bytes();
        let signature = fleet_key
            .sign(&signing_bytes(&fleet, &peer, expires_unix_ms))
            .to_bytes()
            .to_vec();
        Self {
            fleet,
            peer,
            expires_unix_ms,
            signature,
        }
    }

    /// Encodes for the wire and for fleet files.
    pub fn to_bytes(&self) -> Vec<u8> {
        encode(self)
    }

    /// Decodes, bounded.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, FleetError> {
        Ok(decode_bounded(bytes, MAX_TOKEN_BYTES)?)
    }

    /// Checks the token for `fleet`, presented by `presenter`, at `now_unix_ms`.
    pub fn verify(
        &self,
        fleet: &PeerKey,
        presenter: &PeerKey,
        now_unix_ms: u64,
    ) -> Result<(), FleetError> {
        if &self.fleet != fleet {
            return Err(FleetError::WrongFleet);
        }
        if &self.peer != presenter {
            return Err(FleetError::WrongPeer);
        }
        let key = VerifyingKey::from_bytes(fleet).map_err(|_| FleetError::BadSignature)?;
        let signature =
            Signature::from_slice(&self.signature).map_err(|_| FleetError::BadSignature)?;
        key.verify_strict(
            &signing_bytes(&self.fleet, &self.peer, self.expires_unix_ms),
            &signature,
        )
        .map_err(|_| FleetError::BadSignature)?;
        if self.expires_unix_ms != 0 && now_unix_ms >= self.expires_unix_ms {
            return Err(FleetError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn pk(seed: u8) -> PeerKey {
        key(seed).verifying_key().to_bytes()
    }

    #[test]
    fn an_issued_token_verifies_for_its_peer_until_it_expires() {
        let token = EnrollmentToken::issue(&key(1), pk(2), 1_000);
        let decoded = EnrollmentToken::from_bytes(&token.to_bytes()).expect("decode");
        assert_eq!(decoded.verify(&pk(1), &pk(2), 999), Ok(()));
        assert_eq!(
            decoded.verify(&pk(1), &pk(2), 1_000),
            Err(FleetError::Expired)
        );
        let forever = EnrollmentToken::issue(&key(1), pk(2), 0);
        assert_eq!(forever.verify(&pk(1), &pk(2), u64::MAX), Ok(()));
    }

    #[test]
    fn a_token_shown_by_another_peer_or_for_another_fleet_is_refused() {
        let token = EnrollmentToken::issue(&key(1), pk(2), 0);
        assert_eq!(token.verify(&pk(1), &pk(3), 0), Err(FleetError::WrongPeer));
        assert_eq!(token.verify(&pk(9), &pk(2), 0), Err(FleetError::WrongFleet));
    }

    #[test]
    fn a_forged_or_altered_token_is_refused() {
        let mut token = EnrollmentToken::issue(&key(1), pk(2), 5);
        token.expires_unix_ms = 0;
        assert_eq!(
            token.verify(&pk(1), &pk(2), 10),
            Err(FleetError::BadSignature)
        );
        let mut forged = EnrollmentToken::issue(&key(7), pk(2), 0);
        forged.fleet = pk(1);
        assert_eq!(
            forged.verify(&pk(1), &pk(2), 0),
            Err(FleetError::BadSignature)
        );
        assert!(EnrollmentToken::from_bytes(&[0xff; 300]).is_err());
        assert!(EnrollmentToken::from_bytes(b"junk").is_err());
    }
}
