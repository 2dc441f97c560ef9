//! The interface between the training actors and the model: a [`Learner`] owns the model and its
//! inner optimizer, and exchanges parameters with the rest of the peer as flat `f32` vectors.
//!
//! Only the trainer crate touches tensors; the exchanger sees parameters, gradients and
//! pseudo-gradients as plain slices in one canonical order, so aggregation and the outer step are
//! plain Rust and bit-identical on every peer.

use loom_protocols::PeerKey;

/// What one call to the learner did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepReport {
    /// Optimizer (or gradient) steps taken.
    pub steps: u32,
    /// Mean training loss over those steps (nats per token).
    pub loss_mean: f32,
    /// Tokens consumed (batch × context × steps).
    pub tokens: u64,
    /// Seconds spent in forward, backward and the optimizer.
    pub compute_s: f64,
}

/// Why the learner could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum LearnerError {
    /// A flat vector of the wrong length.
    #[error("parameter vector of {got} values, the model has {expected}")]
    Length {
        /// Values given.
        got: usize,
        /// Values the model has.
        expected: usize,
    },
    /// A non-finite loss or parameter.
    #[error("training diverged: {0}")]
    Diverged(String),
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(String),
}

/// Where a peer's training data comes from in a round: every peer can compute every other
/// peer's shard from the job seed and the peer's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardKey {
    /// The job's data seed.
    pub seed: u64,
    /// The training peer.
    pub peer: PeerKey,
}

/// A model with its inner optimizer, driven by the Trainer actor. Implementations may block for
/// as long as the computation takes.
pub trait Learner: Send + 'static {
    /// Number of parameters (the length of every flat vector).
    fn param_count(&self) -> usize;
    /// The parameters, flattened in the canonical order.
    fn params(&self) -> Vec<f32>;
    /// Replaces the parameters (the inner optimizer state is kept).
    fn set_params(&mut self, flat: &[f32]) -> Result<(), LearnerError>;
    /// `steps` inner optimizer steps on the shard of `shard.peer`, global step indices
    /// `first_step..first_step + steps` (each index picks its own batch).
    fn train_inner(
        &mut self,
        first_step: u64,
        steps: u32,
        shard: ShardKey,
    ) -> Result<StepReport, LearnerError>;
    /// The gradient of the loss on the batch of global step `step` without stepping.
    fn gradient(
        &mut self,
        step: u64,
        shard: ShardKey,
    ) -> Result<(Vec<f32>, StepReport), LearnerError>;
    /// Mean validation loss over a fixed set of held-out batches (the same on every peer).
    fn validation_loss(&mut self) -> Result<f32, LearnerError>;
    /// The loss of the current parameters on the training batch of global step `step` for
    /// `shard`, without gradients (the verifier's cheap check of a contribution).
    fn batch_loss(&mut self, step: u64, shard: ShardKey) -> Result<f32, LearnerError>;
    /// Tokens in one training batch (batch × context).
    fn tokens_per_step(&self) -> u64;
    /// Starts the inner optimizer afresh (an auditor recomputing another peer's work does not
    /// carry its own optimizer state into it). The default keeps the state.
    fn reset_optimizer(&mut self) -> Result<(), LearnerError> {
        Ok(())
    }
}
