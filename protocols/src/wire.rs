//! Bounded binary encoding of every message that crosses the network.
//!
//! All wire types go through [`encode`] and [`decode_bounded`]: bincode 2 with a hard size limit,
//! so a remote peer can never make a decoder allocate more than the limit it was given, and
//! trailing bytes are an error rather than silently ignored.

use serde::{Serialize, de::DeserializeOwned};

/// Why a message could not be encoded or decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// The input is larger than the limit for its type.
    #[error("message of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    TooLarge {
        /// The size of the offered input.
        size_bytes: usize,
        /// The limit for this message type.
        limit_bytes: usize,
    },
    /// The bytes are not a valid encoding of the expected type.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A valid value was followed by extra bytes.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// Encodes `value` for the wire.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding into a Vec cannot fail for the plain data types of this crate.
    bincode::serde::encode_to_vec(value, config()).unwrap_or_default()
}

/// Decodes a `T` from `bytes`, refusing inputs over `limit_bytes` and inputs with trailing bytes.
pub fn decode_bounded<T: DeserializeOwned>(
    bytes: &[u8],
    limit_bytes: usize,
) -> Result<T, WireError> {
    if bytes.len() > limit_bytes {
        return Err(WireError::TooLarge {
            size_bytes: bytes.len(),
            limit_bytes,
        });
    }
    let (value, read) =
        bincode::serde::decode_from_slice::<T, _>(bytes, config().with_limit::<{ 1 << 20 }>())
            .map_err(|e| WireError::Malformed(e.to_string()))?;
    if read != bytes.len() {
        return Err(WireError::Trailing(bytes.len() - read));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_input_is_refused_before_decoding() {
        let bytes = vec![0u8; 100];
        assert_eq!(
            decode_bounded::<u8>(&bytes, 10),
            Err(WireError::TooLarge {
                size_bytes: 100,
                limit_bytes: 10
            })
        );
    }

    #[test]
    fn trailing_bytes_are_an_error() {
        let mut bytes = encode(&7u32);
        bytes.push(1);
        assert_eq!(
            decode_bounded::<u32>(&bytes, 64),
            Err(WireError::Trailing(1))
        );
    }

    #[test]
    fn a_huge_length_prefix_does_not_allocate() {
        // A Vec<u8> claiming 2^40 elements in 9 bytes.
        let bytes = [0xfd, 0, 0, 0, 0, 0, 1, 0, 0];
        assert!(matches!(
            decode_bounded::<Vec<u8>>(&bytes, 64),
            Err(WireError::Malformed(_))
        ));
    }
}
