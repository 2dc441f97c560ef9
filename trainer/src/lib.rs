//! The tch side of a Loom peer: datasets ([`dataset`]), model definitions ([`model`]) and the
//! [`TchLearner`] ([`learner`]) that implements [`loom_actors::Learner`] with libtorch, so the
//! Trainer actor can drive inner optimizer steps and exchange parameters as flat `f32` vectors.
//!
//! This file owns the crate's error type, [`TrainerError`].

pub mod dataset;
pub mod learner;
pub mod model;

pub use dataset::{Dataset, Vocab};
pub use learner::{DeviceChoice, LearnerConfig, TchLearner, cuda_available};
pub use model::ModelSpec;

use std::path::PathBuf;

/// Why a dataset, model or learner could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A dataset file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Text given for the character vocabulary is not UTF-8.
    #[error(
        "the text is not valid UTF-8 (first bad byte at offset {valid_up_to}); use the byte vocabulary for binary data"
    )]
    Utf8 {
        /// Length of the valid UTF-8 prefix.
        valid_up_to: usize,
    },
    /// A dataset download failed.
    #[error("downloading {url}: {message}")]
    Download {
        /// The address asked for.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A dataset that cannot be trained on (empty, too short for the context, bad tokens).
    #[error("dataset: {0}")]
    Dataset(String),
    /// A model spec field out of range.
    #[error("model spec field `{field}`: {message}")]
    ModelSpec {
        /// The offending field.
        field: &'static str,
        /// Why it is refused.
        message: String,
    },
    /// A learner configuration field out of range.
    #[error("learner config field `{field}`: {message}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// Why it is refused.
        message: String,
    },
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(String),
}

impl From<tch::TchError> for TrainerError {
    fn from(error: tch::TchError) -> Self {
        Self::Torch(error.to_string())
    }
}
