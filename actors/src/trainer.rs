//! The Trainer actor: owns the [`Learner`] (the model and its inner optimizer) and runs its
//! computations off the async runtime, one at a time, in the order asked.
//!
//! Each request carries the global parameters to start from; the answer goes back to the
//! requesting exchanger as a message, so the exchanger keeps serving the network while the model
//! trains. The learner moves into a blocking task for the computation and comes back with the
//! result; if the blocking task panics, the actor fails and its supervisor decides.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};

use loom_protocols::compress::SparseUpdate;

use crate::{
    ExchangerMsg, Learner, ShardKey,
    learner::{LearnerError, StepReport},
};

/// What to compute in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// DiLoCo: `steps` inner steps from global step `first_step`; the answer is the
    /// pseudo-gradient `start − after`.
    Inner {
        /// First global step index.
        first_step: u64,
        /// Inner steps.
        steps: u32,
    },
    /// Sync: one gradient at global step `step`.
    Gradient {
        /// Global step index.
        step: u64,
    },
}

/// One contribution for the cheap check: its update, how far along it the check steps, and the
/// batch it was assigned.
#[derive(Debug, Clone)]
pub struct LossCandidate {
    /// The contributor.
    pub author: loom_protocols::PeerKey,
    /// Its decoded update.
    pub update: Arc<SparseUpdate>,
    /// The checked parameters are `params − step_scale × update`.
    pub step_scale: f32,
    /// The global steps whose batches of `shard` the loss is measured on (the mean).
    pub batch_steps: Vec<u64>,
    /// The contributor's shard.
    pub shard: ShardKey,
}

/// The cheap check's measurement of one contribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossMeasured {
    /// The contributor.
    pub author: loom_protocols::PeerKey,
    /// Loss on its assigned batch at the round's starting parameters.
    pub before: f32,
    /// Loss on the same batch after its update.
    pub after: f32,
}

/// Messages of the Trainer actor.
#[derive(Debug)]
pub enum TrainerMsg {
    /// Load `params` and report the validation loss as [`ExchangerMsg::Evaluated`].
    Evaluate {
        /// The round the parameters are after.
        round: u64,
        /// Global parameters.
        params: Arc<Vec<f32>>,
        /// Where the answer goes.
        reply_to: ActorRef<ExchangerMsg>,
    },
    /// Load `params`, do `work` on `shard`, answer with [`ExchangerMsg::Trained`].
    Train {
        /// The round trained for.
        round: u64,
        /// Global parameters to start from.
        params: Arc<Vec<f32>>,
        /// What to compute.
        work: Work,
        /// Whose data.
        shard: ShardKey,
        /// Where the answer goes.
        reply_to: ActorRef<ExchangerMsg>,
    },
    /// Audit: recompute `subject`'s work of `round` (its shard, from `params`, with a fresh
    /// inner optimizer) and answer with [`ExchangerMsg::Audited`].
    Audit {
        /// The round audited.
        round: u64,
        /// Whose contribution.
        subject: loom_protocols::PeerKey,
        /// The global parameters the round started from.
        params: Arc<Vec<f32>>,
        /// What the subject had to compute.
        work: Work,
        /// The subject's shard.
        shard: ShardKey,
        /// Where the answer goes.
        reply_to: ActorRef<ExchangerMsg>,
    },
    /// The cheap check: the loss of each candidate's assigned batch at `params` and after its
    /// update, answered with [`ExchangerMsg::LossChecked`].
    CheckLoss {
        /// The round checked.
        round: u64,
        /// The global parameters the round started from.
        params: Arc<Vec<f32>>,
        /// The contributions.
        candidates: Vec<LossCandidate>,
        /// Where the answer goes.
        reply_to: ActorRef<ExchangerMsg>,
    },
}

/// The Trainer actor.
#[derive(Debug, Default, Clone)]
pub struct TrainerActor;

/// State: the learner, absent only while a computation holds it.
pub struct TrainerState {
    learner: Option<Box<dyn Learner>>,
}

/// A learner behind a mutex so it can be handed to the actor as its (cloneable) argument.
pub type LearnerSlot = Arc<std::sync::Mutex<Option<Box<dyn Learner>>>>;

async fn with_learner<T: Send + 'static>(
    state: &mut TrainerState,
    job: impl FnOnce(&mut dyn Learner) -> T + Send + 'static,
) -> Result<T, ActorProcessingErr> {
    let mut learner = state
        .learner
        .take()
        .ok_or_else(|| ActorProcessingErr::from("learner lost by an earlier failure"))?;
    let (learner, out) = tokio::task::spawn_blocking(move || {
        let out = job(learner.as_mut());
        (learner, out)
    })
    .await
    .map_err(|e| ActorProcessingErr::from(format!("training task failed: {e}")))?;
    state.learner = Some(learner);
    Ok(out)
}

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = TrainerState;
    type Arguments = LearnerSlot;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        slot: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let learner = slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| ActorProcessingErr::from("no learner to start with"))?;
        Ok(TrainerState {
            learner: Some(learner),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            TrainerMsg::Evaluate {
                round,
                params,
                reply_to,
            } => {
                let result = with_learner(state, move |learner| {
                    learner.set_params(&params)?;
                    learner.validation_loss()
                })
                .await?;
                let _ = reply_to.cast(ExchangerMsg::Evaluated {
                    round,
                    val_loss: result.map_err(|e| e.to_string()),
                });
            }
            TrainerMsg::Train {
                round,
                params,
                work,
                shard,
                reply_to,
            } => {
                let result =
                    with_learner(state, move |learner| train(learner, &params, work, shard))
                        .await?;
                let _ = reply_to.cast(ExchangerMsg::Trained {
                    round,
                    result: result.map_err(|e| e.to_string()),
                });
            }
            TrainerMsg::Audit {
                round,
                subject,
                params,
                work,
                shard,
                reply_to,
            } => {
                let result = with_learner(state, move |learner| {
                    learner.reset_optimizer()?;
                    train(learner, &params, work, shard)
                })
                .await?;
                let _ = reply_to.cast(ExchangerMsg::Audited {
                    round,
                    subject,
                    result: result.map(|(update, _)| update).map_err(|e| e.to_string()),
                });
            }
            TrainerMsg::CheckLoss {
                round,
                params,
                candidates,
                reply_to,
            } => {
                let result = with_learner(state, move |learner| {
                    check_losses(learner, &params, &candidates)
                })
                .await?;
                let _ = reply_to.cast(ExchangerMsg::LossChecked {
                    round,
                    result: result.map_err(|e| e.to_string()),
                });
            }
        }
        Ok(())
    }
}

/// Each candidate's loss on its assigned batch at `params` and at `params − scale × update`.
pub fn check_losses(
    learner: &mut dyn Learner,
    params: &[f32],
    candidates: &[LossCandidate],
) -> Result<Vec<LossMeasured>, LearnerError> {
    learner.set_params(params)?;
    let before = candidates
        .iter()
        .map(|c| mean_batch_loss(learner, c))
        .collect::<Result<Vec<f32>, LearnerError>>()?;
    let mut measured = Vec::with_capacity(candidates.len());
    for (candidate, before) in candidates.iter().zip(before) {
        let mut moved = params.to_vec();
        candidate.update.add_into(&mut moved, -candidate.step_scale);
        learner.set_params(&moved)?;
        measured.push(LossMeasured {
            author: candidate.author,
            before,
            after: mean_batch_loss(learner, candidate)?,
        });
    }
    Ok(measured)
}

/// The mean loss of the learner's parameters over a candidate's batches, summed in order in
/// `f64` (NaN when it has none).
fn mean_batch_loss(
    learner: &mut dyn Learner,
    candidate: &LossCandidate,
) -> Result<f32, LearnerError> {
    let mut sum = 0f64;
    for &step in &candidate.batch_steps {
        sum += f64::from(learner.batch_loss(step, candidate.shard)?);
    }
    Ok((sum / candidate.batch_steps.len() as f64) as f32)
}

fn train(
    learner: &mut dyn Learner,
    params: &[f32],
    work: Work,
    shard: ShardKey,
) -> Result<(Vec<f32>, StepReport), LearnerError> {
    learner.set_params(params)?;
    match work {
        Work::Inner { first_step, steps } => {
            let report = learner.train_inner(first_step, steps, shard)?;
            let after = learner.params();
            let pseudo = loom_protocols::outer::pseudo_gradient(params, &after);
            Ok((pseudo, report))
        }
        Work::Gradient { step } => learner.gradient(step, shard),
    }
}
