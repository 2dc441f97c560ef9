//! [`TchLearner`]: a model, its AdamW inner optimizer and the dataset, implementing
//! [`loom_actors::Learner`]. It owns batch selection (training batches from
//! [`loom_protocols::data::batch_offsets`], fixed validation batches), gradient clipping, and the
//! canonical flat parameter order (variables sorted by name, each flattened row-major as `f32`).

use std::sync::Arc;
use std::time::Instant;

use loom_actors::{Learner, LearnerError, ShardKey, StepReport};
use loom_protocols::data::batch_offsets;
use serde::{Deserialize, Serialize};
use tch::nn::{self, OptimizerConfig};
use tch::{Device, Kind, TchError, Tensor};

use crate::model::{self, Model, ModelSpec, NO_DECAY_GROUP};
use crate::{Dataset, TrainerError};

/// Largest accepted batch, in sequences.
pub const MAX_BATCH: usize = 65_536;

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// The first CUDA device when there is one, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device (an error when there is none).
    Cuda,
}

/// Whether libtorch sees a CUDA device.
pub fn cuda_available() -> bool {
    tch::Cuda::is_available()
}

/// Model, optimizer and evaluation settings of a learner; every peer of a job uses the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LearnerConfig {
    /// The architecture.
    pub model: ModelSpec,
    /// Sequences per batch.
    pub batch: usize,
    /// AdamW learning rate (constant).
    pub lr: f64,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW decoupled weight decay, applied to matrices and embeddings only.
    pub weight_decay: f64,
    /// Maximum global gradient norm before each step; 0 turns clipping off.
    pub grad_clip: f64,
    /// Seed of the initial parameters: equal seeds give equal parameters on every peer.
    pub init_seed: i64,
    /// Where the model runs.
    pub device: DeviceChoice,
    /// libtorch intra-op threads; 0 leaves libtorch's default.
    pub threads: usize,
    /// Validation batches (of `batch` sequences) per [`Learner::validation_loss`].
    pub eval_batches: usize,
}

impl Default for LearnerConfig {
    /// nanoGPT's shakespeare-char settings on the default (small) model.
    fn default() -> Self {
        Self {
            model: ModelSpec::default(),
            batch: 12,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            weight_decay: 0.1,
            grad_clip: 1.0,
            init_seed: 1337,
            device: DeviceChoice::Auto,
            threads: 0,
            eval_batches: 16,
        }
    }
}

fn config_error(field: &'static str, message: impl Into<String>) -> TrainerError {
    TrainerError::Config {
        field,
        message: message.into(),
    }
}

impl LearnerConfig {
    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<(), TrainerError> {
        self.model.validate()?;
        if self.batch == 0 || self.batch > MAX_BATCH {
            return Err(config_error(
                "batch",
                format!("{} is outside 1..={MAX_BATCH}", self.batch),
            ));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(config_error(
                "lr",
                format!("{} is not a positive number", self.lr),
            ));
        }
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(config_error(field, format!("{beta} is outside [0, 1)")));
            }
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(config_error("weight_decay", "must be a number ≥ 0"));
        }
        if !(self.grad_clip.is_finite() && self.grad_clip >= 0.0) {
            return Err(config_error("grad_clip", "must be a number ≥ 0 (0 is off)"));
        }
        if self.eval_batches == 0 {
            return Err(config_error("eval_batches", "must be at least 1"));
        }
        if self.threads > 4096 {
            return Err(config_error(
                "threads",
                format!("{} is absurd", self.threads),
            ));
        }
        Ok(())
    }
}

/// A libtorch model with its AdamW state, training on a shared dataset.
pub struct TchLearner {
    config: LearnerConfig,
    dataset: Arc<Dataset>,
    device: Device,
    model: Model,
    /// The trainable tensors in canonical order (sorted by name).
    named_params: Vec<(String, Tensor)>,
    param_count: usize,
    optimizer: nn::Optimizer,
    /// Owns the variables the optimizer tracks.
    _var_store: nn::VarStore,
}

impl std::fmt::Debug for TchLearner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TchLearner")
            .field("config", &self.config)
            .field("device", &self.device)
            .field("param_count", &self.param_count)
            .finish_non_exhaustive()
    }
}

fn torch(error: TchError) -> LearnerError {
    LearnerError::Torch(error.to_string())
}

/// The inner AdamW (no weight decay on the no-decay group).
fn build_optimizer(
    config: &LearnerConfig,
    var_store: &nn::VarStore,
) -> Result<nn::Optimizer, TchError> {
    let mut optimizer = nn::adamw(config.beta1, config.beta2, config.weight_decay)
        .eps(1e-8)
        .build(var_store, config.lr)?;
    optimizer.set_weight_decay_group(NO_DECAY_GROUP, 0.0);
    Ok(optimizer)
}

impl TchLearner {
    /// Builds the model on the configured device with parameters drawn from `init_seed`, and its
    /// optimizer. Refuses bad configs and datasets too short for the context.
    pub fn new(config: LearnerConfig, dataset: Arc<Dataset>) -> Result<Self, TrainerError> {
        config.validate()?;
        dataset.check_usable(config.model.context())?;
        if config.threads > 0 {
            tch::set_num_threads(config.threads as i32);
        }
        let device = match config.device {
            DeviceChoice::Auto => Device::cuda_if_available(),
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda if tch::Cuda::is_available() => Device::Cuda(0),
            DeviceChoice::Cuda => {
                return Err(config_error(
                    "device",
                    "CUDA was asked for but is not available",
                ));
            }
        };
        let var_store = nn::VarStore::new(device);
        let model = Model::new(&config.model, dataset.vocab_size, &var_store.root())?;
        let mut named_params: Vec<(String, Tensor)> = var_store.variables().into_iter().collect();
        named_params.sort_by(|a, b| a.0.cmp(&b.0));
        model::initialize(&config.model, &named_params, config.init_seed)?;
        let param_count = named_params.iter().map(|(_, t)| t.numel()).sum();
        let optimizer = build_optimizer(&config, &var_store)?;
        Ok(Self {
            config,
            dataset,
            device,
            model,
            named_params,
            param_count,
            optimizer,
            _var_store: var_store,
        })
    }

    /// The configuration it was built with.
    pub fn config(&self) -> &LearnerConfig {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dataset it trains on.
    pub fn dataset(&self) -> &Arc<Dataset> {
        &self.dataset
    }

    /// The parameter names in canonical order, with their shapes.
    pub fn param_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.named_params
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.size()))
            .collect()
    }

    /// The parameters in canonical order as one flat CPU `f32` vector.
    pub fn try_params(&self) -> Result<Vec<f32>, TrainerError> {
        let _guard = tch::no_grad_guard();
        let flat_parts = self
            .named_params
            .iter()
            .map(|(_, t)| t.f_reshape([-1]))
            .collect::<Result<Vec<_>, TchError>>()?;
        flatten_to_cpu(&flat_parts, self.param_count).map_err(TrainerError::from)
    }

    /// Sequences of context + 1 tokens starting at `starts` in `tokens`, as a (B, T+1) int64
    /// tensor on the model's device.
    fn sequences(&self, tokens: &[u32], starts: &[usize]) -> Result<Tensor, TchError> {
        let width = self.config.model.context() + 1;
        let mut ids = Vec::with_capacity(starts.len() * width);
        for &start in starts {
            let window = tokens.get(start..start + width).ok_or_else(|| {
                TchError::Shape(format!(
                    "sequence at {start} runs past the {} tokens",
                    tokens.len()
                ))
            })?;
            ids.extend(window.iter().map(|t| i64::from(*t)));
        }
        Tensor::f_from_slice(&ids)?
            .f_view([starts.len() as i64, width as i64])?
            .f_to(self.device)
    }

    /// The training batch of global step `step` for `shard`.
    fn train_batch(&self, step: u64, shard: &ShardKey) -> Result<Tensor, TchError> {
        let train = &self.dataset.train;
        let starts = batch_offsets(
            train.len(),
            self.config.model.context(),
            self.config.batch,
            shard.seed,
            step,
            &shard.peer,
        );
        self.sequences(train, &starts)
    }

    /// Start offsets of the validation sequences: with `n = eval_batches · batch` and
    /// `span = val.len() − context − 1`, sequence `j` starts at `j · span / n` (integer division).
    pub fn validation_offsets(&self) -> Vec<usize> {
        let n = (self.config.eval_batches * self.config.batch) as u128;
        let span = self
            .dataset
            .val
            .len()
            .saturating_sub(self.config.model.context() + 1) as u128;
        (0..n).map(|j| (j * span / n) as usize).collect()
    }

    /// Scales the gradients so their global L2 norm is at most `max_norm`, as
    /// `torch.nn.utils.clip_grad_norm_` does (coefficient `max_norm / (norm + 1e-6)` clamped to
    /// 1, applied on the device without a host round trip).
    fn clip_gradients(&self, max_norm: f64) -> Result<(), TchError> {
        let _guard = tch::no_grad_guard();
        let grads: Vec<Tensor> = self
            .named_params
            .iter()
            .map(|(_, t)| t.grad())
            .filter(Tensor::defined)
            .collect();
        if grads.is_empty() {
            return Ok(());
        }
        let norms = grads
            .iter()
            .map(Tensor::f_norm)
            .collect::<Result<Vec<_>, TchError>>()?;
        let total_norm = Tensor::f_stack(&norms, 0)?.f_norm()?;
        let coefficient = Tensor::f_scalar_tensor(max_norm, (Kind::Float, self.device))?
            .f_div(&total_norm.f_add_scalar(1e-6)?)?
            .f_clamp_max(1.0)?;
        for mut grad in grads {
            let _ = grad.f_mul_(&coefficient)?;
        }
        Ok(())
    }

    /// One forward and backward pass on `batch`, leaving the gradients in place; returns the
    /// detached loss.
    fn forward_backward(&mut self, batch: &Tensor) -> Result<Tensor, TchError> {
        self.optimizer.zero_grad();
        let loss = self.model.loss(batch)?;
        loss.f_backward()?;
        loss.f_detach()
    }

    fn train_steps(
        &mut self,
        first_step: u64,
        steps: u32,
        shard: &ShardKey,
    ) -> Result<(f64, f64), TchError> {
        // The timer includes assembling each batch (copying B × (T+1) token ids to the device):
        // microseconds against the milliseconds of a step. It stops after reading the loss sum
        // back, which waits for the device.
        let start = Instant::now();
        let mut loss_sum = Tensor::f_zeros([], (Kind::Float, self.device))?;
        for step in first_step..first_step + u64::from(steps) {
            let batch = self.train_batch(step, shard)?;
            let loss = self.forward_backward(&batch)?;
            if self.config.grad_clip > 0.0 {
                self.clip_gradients(self.config.grad_clip)?;
            }
            self.optimizer.step();
            loss_sum = loss_sum.f_add(&loss)?;
        }
        let loss_sum = f64::try_from(&loss_sum)?;
        Ok((loss_sum, start.elapsed().as_secs_f64()))
    }

    /// The gradients in canonical order, zeros where a tensor has none.
    fn flat_gradient(&self) -> Result<Vec<f32>, TchError> {
        let _guard = tch::no_grad_guard();
        let parts = self
            .named_params
            .iter()
            .map(|(_, t)| {
                let grad = t.grad();
                if grad.defined() {
                    grad.f_reshape([-1])
                } else {
                    Tensor::f_zeros([t.numel() as i64], (Kind::Float, self.device))
                }
            })
            .collect::<Result<Vec<_>, TchError>>()?;
        flatten_to_cpu(&parts, self.param_count)
    }

    fn mean_validation_loss(&self) -> Result<f64, TchError> {
        let _guard = tch::no_grad_guard();
        let offsets = self.validation_offsets();
        let mut loss_sum = Tensor::f_zeros([], (Kind::Float, self.device))?;
        for starts in offsets.chunks(self.config.batch) {
            let batch = self.sequences(&self.dataset.val, starts)?;
            loss_sum = loss_sum.f_add(&self.model.loss(&batch)?)?;
        }
        Ok(f64::try_from(&loss_sum)? / self.config.eval_batches as f64)
    }
}

/// Concatenates 1-D tensors and copies them to a CPU `f32` vector of `len` values.
fn flatten_to_cpu(parts: &[Tensor], len: usize) -> Result<Vec<f32>, TchError> {
    let flat = Tensor::f_cat(parts, 0)?
        .f_to_kind(Kind::Float)?
        .f_to(Device::Cpu)?
        .f_contiguous()?;
    let mut out = vec![0f32; len];
    flat.f_copy_data(&mut out, len)?;
    Ok(out)
}

impl Learner for TchLearner {
    fn param_count(&self) -> usize {
        self.param_count
    }

    fn params(&self) -> Vec<f32> {
        // Copying contiguous f32 tensors out cannot fail short of libtorch running out of
        // memory; the trait offers no error to return.
        self.try_params()
            .expect("copying the parameters out of libtorch")
    }

    fn reset_optimizer(&mut self) -> Result<(), LearnerError> {
        self.optimizer = build_optimizer(&self.config, &self._var_store).map_err(torch)?;
        Ok(())
    }

    fn set_params(&mut self, flat: &[f32]) -> Result<(), LearnerError> {
        if flat.len() != self.param_count {
            return Err(LearnerError::Length {
                got: flat.len(),
                expected: self.param_count,
            });
        }
        let _guard = tch::no_grad_guard();
        let source = Tensor::f_from_slice(flat)
            .and_then(|t| t.f_to(self.device))
            .map_err(torch)?;
        let mut offset = 0i64;
        for (_, tensor) in &self.named_params {
            let numel = tensor.numel() as i64;
            let part = source
                .f_narrow(0, offset, numel)
                .and_then(|p| p.f_view(tensor.size().as_slice()))
                .map_err(torch)?;
            let mut target = tensor.shallow_clone();
            target.f_copy_(&part).map_err(torch)?;
            offset += numel;
        }
        Ok(())
    }

    fn train_inner(
        &mut self,
        first_step: u64,
        steps: u32,
        shard: ShardKey,
    ) -> Result<StepReport, LearnerError> {
        let (loss_sum, compute_s) = self.train_steps(first_step, steps, &shard).map_err(torch)?;
        let loss_mean = if steps == 0 {
            0.0
        } else {
            loss_sum / f64::from(steps)
        };
        if !loss_mean.is_finite() {
            return Err(LearnerError::Diverged(format!(
                "mean training loss {loss_mean} over steps {first_step}..{}",
                first_step + u64::from(steps)
            )));
        }
        Ok(StepReport {
            steps,
            loss_mean: loss_mean as f32,
            tokens: self.tokens_per_step() * u64::from(steps),
            compute_s,
        })
    }

    fn gradient(
        &mut self,
        step: u64,
        shard: ShardKey,
    ) -> Result<(Vec<f32>, StepReport), LearnerError> {
        let start = Instant::now();
        let batch = self.train_batch(step, &shard).map_err(torch)?;
        let loss = self.forward_backward(&batch).map_err(torch)?;
        let loss = f64::try_from(&loss).map_err(torch)?;
        let gradient = self.flat_gradient().map_err(torch)?;
        self.optimizer.zero_grad();
        let compute_s = start.elapsed().as_secs_f64();
        if !loss.is_finite() {
            return Err(LearnerError::Diverged(format!(
                "loss {loss} at step {step}"
            )));
        }
        Ok((
            gradient,
            StepReport {
                steps: 1,
                loss_mean: loss as f32,
                tokens: self.tokens_per_step(),
                compute_s,
            },
        ))
    }

    fn validation_loss(&mut self) -> Result<f32, LearnerError> {
        let loss = self.mean_validation_loss().map_err(torch)?;
        if !loss.is_finite() {
            return Err(LearnerError::Diverged(format!("validation loss {loss}")));
        }
        Ok(loss as f32)
    }

    fn batch_loss(&mut self, step: u64, shard: ShardKey) -> Result<f32, LearnerError> {
        let _guard = tch::no_grad_guard();
        let batch = self.train_batch(step, &shard).map_err(torch)?;
        let loss = self.model.loss(&batch).map_err(torch)?;
        let loss = f64::try_from(&loss).map_err(torch)?;
        Ok(loss as f32)
    }

    fn tokens_per_step(&self) -> u64 {
        (self.config.batch * self.config.model.context()) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Vocab;

    fn tiny_transformer() -> ModelSpec {
        ModelSpec::Transformer {
            layers: 1,
            heads: 2,
            width: 16,
            context: 8,
        }
    }

    fn tiny_mlp() -> ModelSpec {
        ModelSpec::Mlp {
            hidden: 32,
            layers: 1,
            embed: 8,
            context: 4,
        }
    }

    fn config(model: ModelSpec) -> LearnerConfig {
        LearnerConfig {
            model,
            batch: 4,
            lr: 1e-2,
            device: DeviceChoice::Cpu,
            threads: 1,
            eval_batches: 4,
            ..LearnerConfig::default()
        }
    }

    fn data() -> Arc<Dataset> {
        Arc::new(Dataset::builtin(7, 20_000))
    }

    fn learner(model: ModelSpec) -> TchLearner {
        TchLearner::new(config(model), data()).expect("learner")
    }

    const SHARD: ShardKey = ShardKey {
        seed: 3,
        peer: [9; 32],
    };

    #[test]
    fn the_loss_check_passes_real_work_and_refuses_its_reverse_and_nothing() {
        use loom_actors::trainer::{LossCandidate, check_losses};
        use loom_protocols::compress::SparseUpdate;
        let mut trainer = learner(tiny_mlp());
        let start = trainer.params();
        trainer.train_inner(0, 5, SHARD).expect("train");
        let pseudo = loom_protocols::outer::pseudo_gradient(&start, &trainer.params());
        let dense = |values: Vec<f32>| {
            std::sync::Arc::new(SparseUpdate {
                len: values.len(),
                indices: (0..values.len() as u32).collect(),
                values,
            })
        };
        let candidate = |author: u8, update: Vec<f32>| LossCandidate {
            author: [author; 32],
            update: dense(update),
            step_scale: 1.0,
            batch_steps: vec![1, 3],
            shard: SHARD,
        };
        let candidates = vec![
            candidate(1, pseudo.clone()),
            candidate(2, pseudo.iter().map(|v| -v).collect()),
            candidate(3, vec![0.0; pseudo.len()]),
        ];
        let mut checker = learner(tiny_mlp());
        let measured = check_losses(&mut checker, &start, &candidates).expect("check");
        assert_eq!(measured.len(), 3);
        // Every candidate starts from the same model on its own batch.
        assert!(measured.iter().all(|m| m.before == measured[0].before));
        assert!(measured[0].after < measured[0].before, "{measured:?}");
        assert!(measured[1].after > measured[1].before, "{measured:?}");
        assert_eq!(measured[2].after, measured[2].before);
        // The same measurement on another learner is bit-identical: every peer refuses alike.
        let again = check_losses(&mut learner(tiny_mlp()), &start, &candidates).expect("check");
        assert_eq!(measured, again);
    }

    #[test]
    fn params_round_trip_bit_exactly() {
        let mut a = learner(tiny_transformer());
        let params = a.params();
        assert_eq!(params.len(), a.param_count());
        assert_eq!(a.param_count(), tiny_transformer().param_count(32));
        let shifted: Vec<f32> = params.iter().map(|p| p * 1.5 + 1e-3).collect();
        a.set_params(&shifted).expect("set");
        let back = a.params();
        assert!(
            back.iter()
                .zip(&shifted)
                .all(|(x, y)| x.to_bits() == y.to_bits())
        );
        match a.set_params(&params[1..]) {
            Err(LearnerError::Length { got, expected }) => {
                assert_eq!((got, expected), (params.len() - 1, params.len()));
            }
            other => panic!("expected a length error, got {other:?}"),
        }
    }

    #[test]
    fn equal_configs_start_from_equal_params_and_the_seed_matters() {
        let a = learner(tiny_transformer()).params();
        let b = learner(tiny_transformer()).params();
        assert_eq!(a, b);
        let mut other_seed = config(tiny_transformer());
        other_seed.init_seed = 1;
        let c = TchLearner::new(other_seed, data())
            .expect("learner")
            .params();
        assert_ne!(a, c);
    }

    #[test]
    fn initialization_follows_nanogpt() {
        let learner = learner(ModelSpec::Transformer {
            layers: 2,
            heads: 2,
            width: 64,
            context: 8,
        });
        let names: Vec<String> = learner.param_shapes().into_iter().map(|(n, _)| n).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(names.contains(&"h.1.attn.c_attn.weight".to_string()));
        assert!(names.contains(&"lm_head.weight".to_string()));
        assert!(!names.contains(&"lm_head.bias".to_string()));
        let std = |name: &str| -> f64 {
            let (_, t) = learner
                .named_params
                .iter()
                .find(|(n, _)| n == name)
                .expect("param");
            f64::try_from(t.std(true)).expect("std")
        };
        let mean = |name: &str| -> f64 {
            let (_, t) = learner
                .named_params
                .iter()
                .find(|(n, _)| n == name)
                .expect("param");
            f64::try_from(t.mean(Kind::Float)).expect("mean")
        };
        assert!((std("wte.weight") - 0.02).abs() < 0.003);
        assert!((std("h.0.mlp.c_fc.weight") - 0.02).abs() < 0.002);
        assert!((std("h.0.mlp.c_proj.weight") - 0.01).abs() < 0.001);
        assert_eq!(mean("h.0.ln_1.weight"), 1.0);
        assert_eq!(mean("ln_f.bias"), 0.0);
        assert_eq!(mean("h.1.attn.c_attn.bias"), 0.0);
    }

    #[test]
    fn training_lowers_the_validation_loss() {
        // The built-in text is near-uniform in unigrams and bigrams (about 3.46 and 3.27 nats):
        // a model must learn the joint effect of the last two symbols to go far below ln 32, so
        // a few hundred small steps give a modest but clear drop.
        let data = Arc::new(Dataset::builtin(7, 100_000));
        let mlp = ModelSpec::Mlp {
            hidden: 128,
            layers: 1,
            embed: 16,
            context: 2,
        };
        for (model, margin) in [(tiny_transformer(), 0.05), (mlp, 0.1)] {
            let config = LearnerConfig {
                batch: 16,
                eval_batches: 8,
                ..config(model)
            };
            let mut learner = TchLearner::new(config, data.clone()).expect("learner");
            let before = learner.validation_loss().expect("val");
            assert!((before - 32f32.ln()).abs() < 0.1, "{model:?}: {before}");
            let report = learner.train_inner(0, 300, SHARD).expect("train");
            assert_eq!(report.steps, 300);
            assert_eq!(report.tokens, 300 * 16 * model.context() as u64);
            assert!(report.loss_mean.is_finite() && report.compute_s > 0.0);
            let after = learner.validation_loss().expect("val");
            println!(
                "{model:?}: {before} -> {after} in {:.3} s",
                report.compute_s
            );
            assert!(after < before - margin, "{model:?}: {before} -> {after}");
        }
    }

    #[test]
    fn training_is_deterministic_on_the_cpu() {
        for model in [tiny_transformer(), tiny_mlp()] {
            let mut a = learner(model);
            let mut b = learner(model);
            let start = a.params();
            b.set_params(&start).expect("set");
            let report_a = a.train_inner(5, 6, SHARD).expect("train");
            let report_b = b.train_inner(5, 6, SHARD).expect("train");
            assert_eq!(report_a.loss_mean.to_bits(), report_b.loss_mean.to_bits());
            let (pa, pb) = (a.params(), b.params());
            assert!(pa.iter().zip(&pb).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert_ne!(pa, start);
            let other_shard = ShardKey {
                seed: 3,
                peer: [8; 32],
            };
            let mut c = learner(model);
            c.train_inner(5, 6, other_shard).expect("train");
            assert_ne!(c.params(), pa);
        }
    }

    #[test]
    fn gradient_leaves_the_params_alone() {
        let mut learner = learner(tiny_transformer());
        let before = learner.params();
        let (gradient, report) = learner.gradient(3, SHARD).expect("gradient");
        assert_eq!(gradient.len(), learner.param_count());
        assert_eq!(report.steps, 1);
        assert!(gradient.iter().all(|g| g.is_finite()));
        assert!(gradient.iter().any(|g| *g != 0.0));
        assert_eq!(learner.params(), before);
        let (again, _) = learner.gradient(3, SHARD).expect("gradient");
        assert_eq!(again, gradient);
        // The gradient does not leak into the next optimizer step: a fresh learner taking one
        // step lands where this one does.
        learner.train_inner(0, 1, SHARD).expect("train");
        let mut fresh = TchLearner::new(config(tiny_transformer()), data()).expect("learner");
        fresh.train_inner(0, 1, SHARD).expect("train");
        assert_eq!(learner.params(), fresh.params());
    }

    #[test]
    fn validation_batches_are_fixed_and_spread() {
        let mut learner = learner(tiny_transformer());
        let offsets = learner.validation_offsets();
        assert_eq!(offsets.len(), 16);
        let span = learner.dataset().val.len() - 9;
        assert_eq!(offsets[0], 0);
        assert_eq!(offsets[15], 15 * span / 16);
        let a = learner.validation_loss().expect("val");
        assert_eq!(
            a.to_bits(),
            learner.validation_loss().expect("val").to_bits()
        );
    }

    #[test]
    fn bad_configs_and_short_datasets_are_refused() {
        let short = Arc::new(Dataset::from_text(&[b'a'; 50], Vocab::Byte).expect("bytes"));
        let error = TchLearner::new(config(tiny_transformer()), short).expect_err("val too short");
        assert!(matches!(error, TrainerError::Dataset(_)), "{error}");
        let mut bad = config(tiny_transformer());
        bad.batch = 0;
        let error = TchLearner::new(bad, data()).expect_err("batch 0");
        assert!(error.to_string().contains("`batch`"), "{error}");
        let bad = config(ModelSpec::Transformer {
            layers: 1,
            heads: 3,
            width: 16,
            context: 8,
        });
        let error = TchLearner::new(bad, data()).expect_err("heads");
        assert!(error.to_string().contains("`heads`"), "{error}");
    }

    #[test]
    fn the_learner_can_move_to_the_trainer_actor() {
        fn boxed(learner: TchLearner) -> Box<dyn Learner> {
            Box::new(learner)
        }
        let learner = boxed(learner(tiny_mlp()));
        let handle = std::thread::spawn(move || learner.tokens_per_step());
        assert_eq!(handle.join().expect("thread"), 16);
    }

    #[test]
    fn configs_serialize() {
        let json = serde_json::to_string(&LearnerConfig::default()).expect("json");
        assert!(json.contains(r#""device":"auto""#), "{json}");
        let parsed: LearnerConfig =
            serde_json::from_str(r#"{"batch": 8, "device": "cpu"}"#).expect("json");
        assert_eq!(parsed.batch, 8);
        assert_eq!(parsed.device, DeviceChoice::Cpu);
        assert_eq!(parsed.lr, 1e-3);
    }
}
