//! Token datasets: text (built-in Markov text, a file or a download) turned into token ids over a
//! byte or character vocabulary, split 90/10 into training and validation tokens the way nanoGPT
//! splits them, plus a fingerprint so peers can check they train on the same data.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use loom_protocols::data::{ALPHABET, MarkovSource};
use serde::{Deserialize, Serialize};

use crate::TrainerError;

/// The most bytes [`Dataset::from_url`] downloads.
pub const MAX_DOWNLOAD_BYTES: u64 = 512 * 1024 * 1024;

/// Fraction of the tokens that go to the training split (the rest is validation).
pub const TRAIN_FRACTION: f64 = 0.9;

/// How text becomes tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Vocab {
    /// Every byte is a token (vocabulary of 256).
    Byte,
    /// Every distinct Unicode scalar value is a token, numbered in code-point order.
    Char,
}

impl Vocab {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::Byte => b"byte",
            Self::Char => b"char",
        }
    }
}

/// Token ids split into training and validation, with the vocabulary that decodes them.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// How the text was tokenized.
    pub vocab: Vocab,
    /// Number of token ids (every token is below it).
    pub vocab_size: usize,
    /// For [`Vocab::Char`], the character of each token id; empty for [`Vocab::Byte`].
    pub symbols: Vec<char>,
    /// Training tokens: the first 90 % of the text.
    pub train: Vec<u32>,
    /// Validation tokens: the last 10 % of the text.
    pub val: Vec<u32>,
    /// Entropy rate of the source in nats per token, when it is known (the built-in task).
    entropy_rate_nats: Option<f64>,
    /// Where the data came from, for logs.
    description: String,
}

impl Dataset {
    /// The built-in task: `len_chars` characters from the Markov source of `seed`, drawn with
    /// `seed`, over the 32 symbols of [`ALPHABET`] in alphabet order (vocabulary 32 even when a
    /// symbol never occurs).
    pub fn builtin(seed: u64, len_chars: usize) -> Self {
        let source = MarkovSource::new(seed);
        let text = source.generate(len_chars, seed);
        let mut index = [0u32; 256];
        for (id, symbol) in ALPHABET.iter().enumerate() {
            index[usize::from(*symbol)] = id as u32;
        }
        let tokens: Vec<u32> = text.iter().map(|b| index[usize::from(*b)]).collect();
        let (train, val) = split(tokens);
        Self {
            vocab: Vocab::Char,
            vocab_size: ALPHABET.len(),
            symbols: ALPHABET.iter().map(|b| char::from(*b)).collect(),
            train,
            val,
            entropy_rate_nats: Some(source.entropy_rate_nats()),
            description: format!("builtin markov seed {seed}, {len_chars} chars"),
        }
    }

    /// Tokenizes `bytes`: with [`Vocab::Byte`] each byte is a token; with [`Vocab::Char`] the
    /// text must be UTF-8 and each distinct character, sorted by code point, is a token.
    pub fn from_text(bytes: &[u8], vocab: Vocab) -> Result<Self, TrainerError> {
        Self::from_text_described(bytes, vocab, format!("{} bytes of text", bytes.len()))
    }

    /// Reads and tokenizes a file (see [`Dataset::from_text`]).
    pub fn from_file(path: impl AsRef<Path>, vocab: Vocab) -> Result<Self, TrainerError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| TrainerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_text_described(&bytes, vocab, format!("file {}", path.display()))
    }

    /// Downloads (at most [`MAX_DOWNLOAD_BYTES`]) and tokenizes a text (see
    /// [`Dataset::from_text`]). Only plain `http://` addresses work: this build of ureq has no
    /// TLS.
    pub fn from_url(url: &str, vocab: Vocab) -> Result<Self, TrainerError> {
        let download_error = |message: String| TrainerError::Download {
            url: url.to_string(),
            message,
        };
        let mut response = ureq::get(url).call().map_err(|error| match error {
            ureq::Error::StatusCode(code) => download_error(format!("HTTP status {code}")),
            other => download_error(other.to_string()),
        })?;
        let bytes = response
            .body_mut()
            .with_config()
            .limit(MAX_DOWNLOAD_BYTES)
            .read_to_vec()
            .map_err(|error| match error {
                ureq::Error::BodyExceedsLimit(limit) => {
                    download_error(format!("larger than the {limit}-byte limit"))
                }
                other => download_error(other.to_string()),
            })?;
        Self::from_text_described(&bytes, vocab, format!("download {url}"))
    }

    fn from_text_described(
        bytes: &[u8],
        vocab: Vocab,
        description: String,
    ) -> Result<Self, TrainerError> {
        if bytes.is_empty() {
            return Err(TrainerError::Dataset(format!("{description} is empty")));
        }
        let (tokens, vocab_size, symbols) = match vocab {
            Vocab::Byte => (
                bytes.iter().map(|b| u32::from(*b)).collect(),
                256,
                Vec::new(),
            ),
            Vocab::Char => {
                let text = std::str::from_utf8(bytes).map_err(|error| TrainerError::Utf8 {
                    valid_up_to: error.valid_up_to(),
                })?;
                let symbols: Vec<char> =
                    text.chars().collect::<BTreeSet<_>>().into_iter().collect();
                let index: HashMap<char, u32> = symbols
                    .iter()
                    .enumerate()
                    .map(|(id, symbol)| (*symbol, id as u32))
                    .collect();
                let tokens = text
                    .chars()
                    .filter_map(|c| index.get(&c).copied())
                    .collect();
                (tokens, symbols.len(), symbols)
            }
        };
        let (train, val) = split(tokens);
        Ok(Self {
            vocab,
            vocab_size,
            symbols,
            train,
            val,
            entropy_rate_nats: None,
            description,
        })
    }

    /// The source's entropy rate in nats per token (the lowest reachable validation loss), for
    /// the built-in task; `None` for real text.
    pub fn entropy_rate_nats(&self) -> Option<f64> {
        self.entropy_rate_nats
    }

    /// Where the data came from and its shape, for logs.
    pub fn describe(&self) -> String {
        format!(
            "{}: {:?} vocabulary of {}, {} train + {} val tokens",
            self.description,
            self.vocab,
            self.vocab_size,
            self.train.len(),
            self.val.len()
        )
    }

    /// Token ids back to text (ids outside the vocabulary become U+FFFD).
    pub fn decode(&self, tokens: &[u32]) -> String {
        match self.vocab {
            Vocab::Byte => {
                let bytes: Vec<u8> = tokens
                    .iter()
                    .map(|t| u8::try_from(*t).unwrap_or(b'?'))
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            }
            Vocab::Char => tokens
                .iter()
                .map(|t| {
                    self.symbols
                        .get(*t as usize)
                        .copied()
                        .unwrap_or(char::REPLACEMENT_CHARACTER)
                })
                .collect(),
        }
    }

    /// BLAKE3 over a domain tag, the vocabulary kind, the symbols (UTF-8, for the character
    /// vocabulary), and the training then validation tokens, each split prefixed by its length
    /// (u64 little-endian) and each token as u32 little-endian: equal on two peers exactly when
    /// they tokenize the same data the same way.
    pub fn fingerprint(&self) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"loom/dataset/v1\0");
        hasher.update(self.vocab.tag());
        hasher.update(&(self.vocab_size as u64).to_le_bytes());
        let symbols: String = self.symbols.iter().collect();
        hasher.update(&(symbols.len() as u64).to_le_bytes());
        hasher.update(symbols.as_bytes());
        for split in [&self.train, &self.val] {
            hasher.update(&(split.len() as u64).to_le_bytes());
            for token in split.iter() {
                hasher.update(&token.to_le_bytes());
            }
        }
        *hasher.finalize().as_bytes()
    }

    /// Checks that a model reading `context` tokens (plus one target) can train and validate on
    /// this data, and that every token is inside the vocabulary.
    pub fn check_usable(&self, context: usize) -> Result<(), TrainerError> {
        if self.vocab_size == 0 {
            return Err(TrainerError::Dataset("the vocabulary is empty".into()));
        }
        let needed = context + 2;
        for (name, split) in [("training", &self.train), ("validation", &self.val)] {
            if split.len() < needed {
                return Err(TrainerError::Dataset(format!(
                    "the {name} split has {} tokens, a context of {context} needs at least {needed}",
                    split.len()
                )));
            }
            if let Some(bad) = split.iter().find(|t| **t as usize >= self.vocab_size) {
                return Err(TrainerError::Dataset(format!(
                    "the {name} split holds token {bad}, outside the vocabulary of {}",
                    self.vocab_size
                )));
            }
        }
        Ok(())
    }
}

/// nanoGPT's split: the first `(0.9 * len) as usize` tokens train, the rest validate.
fn split(mut tokens: Vec<u32>) -> (Vec<u32>, Vec<u32>) {
    let n = (TRAIN_FRACTION * tokens.len() as f64) as usize;
    let val = tokens.split_off(n);
    (tokens, val)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_vocabulary_is_the_sorted_distinct_characters() {
        let data = Dataset::from_text("hello world, héllo".as_bytes(), Vocab::Char).expect("text");
        let expected: Vec<char> = " ,dehlorwé".chars().collect();
        assert_eq!(data.symbols, expected);
        assert_eq!(data.vocab_size, expected.len());
        let all: Vec<u32> = data.train.iter().chain(&data.val).copied().collect();
        assert_eq!(data.decode(&all), "hello world, héllo");
        assert_eq!(all.len(), 18);
    }

    #[test]
    fn byte_vocabulary_keeps_the_bytes() {
        let data =
            Dataset::from_text(&[0, 255, 7, 7, 1, 2, 3, 4, 5, 6], Vocab::Byte).expect("bytes");
        assert_eq!(data.vocab_size, 256);
        assert!(data.symbols.is_empty());
        assert_eq!(data.train, vec![0, 255, 7, 7, 1, 2, 3, 4, 5]);
        assert_eq!(data.val, vec![6]);
    }

    #[test]
    fn the_split_is_nanogpts() {
        let text = vec![b'a'; 1_001];
        let data = Dataset::from_text(&text, Vocab::Byte).expect("bytes");
        assert_eq!(data.train.len(), 900);
        assert_eq!(data.val.len(), 101);
        let builtin = Dataset::builtin(3, 12_345);
        assert_eq!(builtin.train.len(), (0.9 * 12_345.0) as usize);
        assert_eq!(builtin.train.len() + builtin.val.len(), 12_345);
    }

    #[test]
    fn builtin_has_the_32_symbol_alphabet_and_its_entropy_rate() {
        let data = Dataset::builtin(42, 10);
        assert_eq!(data.vocab_size, 32);
        assert_eq!(data.symbols.len(), 32);
        assert_eq!(data.symbols[0], 'a');
        assert_eq!(data.symbols[31], '\n');
        let h = data.entropy_rate_nats().expect("builtin knows its entropy");
        assert_eq!(h, MarkovSource::new(42).entropy_rate_nats());
        assert!(
            Dataset::from_text(b"abc", Vocab::Byte)
                .expect("bytes")
                .entropy_rate_nats()
                .is_none()
        );
        let text = MarkovSource::new(42).generate(10, 42);
        let all: Vec<u32> = data.train.iter().chain(&data.val).copied().collect();
        assert_eq!(data.decode(&all).as_bytes(), text.as_slice());
    }

    #[test]
    fn non_utf8_text_is_refused_by_the_char_vocabulary() {
        let error = Dataset::from_text(&[b'a', 0xff, b'b'], Vocab::Char).expect_err("not utf-8");
        assert!(
            matches!(error, TrainerError::Utf8 { valid_up_to: 1 }),
            "{error}"
        );
        assert!(Dataset::from_text(&[b'a', 0xff, b'b'], Vocab::Byte).is_ok());
        assert!(Dataset::from_text(b"", Vocab::Byte).is_err());
    }

    #[test]
    fn too_short_datasets_are_refused_for_a_context() {
        let data = Dataset::from_text(&[b'x'; 100], Vocab::Byte).expect("bytes");
        assert!(data.check_usable(8).is_ok());
        let error = data.check_usable(9).expect_err("val split of 10 < 9 + 2");
        assert!(
            error.to_string().contains("validation split has 10 tokens"),
            "{error}"
        );
    }

    #[test]
    fn files_load_and_missing_files_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("text.txt");
        std::fs::write(&path, "abcabcabc").expect("write");
        let data = Dataset::from_file(&path, Vocab::Char).expect("file");
        assert_eq!(data.vocab_size, 3);
        let missing =
            Dataset::from_file(dir.path().join("nope"), Vocab::Char).expect_err("missing");
        assert!(matches!(missing, TrainerError::Io { .. }));
    }

    #[test]
    fn fingerprints_tell_datasets_apart() {
        let a = Dataset::builtin(1, 1_000);
        assert_eq!(a.fingerprint(), Dataset::builtin(1, 1_000).fingerprint());
        assert_ne!(a.fingerprint(), Dataset::builtin(2, 1_000).fingerprint());
        let byte = Dataset::from_text(b"abcd", Vocab::Byte).expect("bytes");
        let char = Dataset::from_text(b"abcd", Vocab::Char).expect("chars");
        assert_ne!(byte.fingerprint(), char.fingerprint());
        assert_ne!(
            char.fingerprint(),
            Dataset::from_text(b"bcde", Vocab::Char)
                .expect("chars")
                .fingerprint()
        );
    }

    #[test]
    fn vocab_serializes_lowercase() {
        assert_eq!(
            serde_json::to_string(&Vocab::Char).expect("json"),
            "\"char\""
        );
        assert_eq!(
            serde_json::from_str::<Vocab>("\"byte\"").expect("json"),
            Vocab::Byte
        );
    }
}
