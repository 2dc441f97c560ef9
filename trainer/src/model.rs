//! Model definitions: the [`ModelSpec`] a job names (a nanoGPT-style transformer or a
//! Bengio-style MLP), its validation and parameter count, the variables each model creates in a
//! var store (with nanoGPT's parameter names), their initialization, and the forward pass to the
//! training loss.
//!
//! Every trainable tensor is created as zeros, then [`initialize`] draws the initial values on the
//! CPU generator in name order, so a PyTorch script reproduces them exactly with
//! `torch.manual_seed(seed)` followed by, for each `(name, p)` in `sorted(named_parameters())`,
//! `p.copy_(torch.empty(p.shape).normal_(0, std))` for the tensors [`init_rule`] draws (and
//! zeros / ones for the others).

use serde::{Deserialize, Serialize};
use tch::nn::Path;
use tch::{Device, Kind, Reduction, TchError, Tensor};

use crate::TrainerError;

/// Optimizer group of the tensors that get weight decay (matrices and embeddings).
pub(crate) const DECAY_GROUP: usize = 0;
/// Optimizer group of the tensors without weight decay (biases, LayerNorm parameters).
pub(crate) const NO_DECAY_GROUP: usize = 1;

/// Largest accepted transformer width / MLP embedding width.
pub const MAX_WIDTH: usize = 4096;
/// Largest accepted MLP hidden width.
pub const MAX_HIDDEN: usize = 16_384;
/// Largest accepted number of layers.
pub const MAX_LAYERS: usize = 64;
/// Largest accepted number of attention heads.
pub const MAX_HEADS: usize = 256;
/// Largest accepted context, in tokens.
pub const MAX_CONTEXT: usize = 4096;

const LAYER_NORM_EPS: f64 = 1e-5;

/// The architecture a job trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ModelSpec {
    /// A GPT-2 / nanoGPT decoder: every position predicts the next token.
    Transformer {
        /// Transformer blocks.
        layers: usize,
        /// Attention heads per block (must divide `width`).
        heads: usize,
        /// Embedding width.
        width: usize,
        /// Tokens per sequence.
        context: usize,
    },
    /// Bengio et al.'s neural language model: the last `context` token embeddings, concatenated,
    /// through `layers` GELU layers, predict the next token.
    Mlp {
        /// Width of each hidden layer.
        hidden: usize,
        /// Hidden layers.
        layers: usize,
        /// Embedding width per token.
        embed: usize,
        /// Tokens in the window.
        context: usize,
    },
}

impl Default for ModelSpec {
    /// nanoGPT's shakespeare-char model scaled down for CPUs: 4 layers, 4 heads, width 128,
    /// context 64.
    fn default() -> Self {
        Self::Transformer {
            layers: 4,
            heads: 4,
            width: 128,
            context: 64,
        }
    }
}

fn check_range(field: &'static str, value: usize, max: usize) -> Result<(), TrainerError> {
    if value == 0 {
        return Err(TrainerError::ModelSpec {
            field,
            message: "must be at least 1".into(),
        });
    }
    if value > max {
        return Err(TrainerError::ModelSpec {
            field,
            message: format!("{value} is above the maximum of {max}"),
        });
    }
    Ok(())
}

impl ModelSpec {
    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<(), TrainerError> {
        match *self {
            Self::Transformer {
                layers,
                heads,
                width,
                context,
            } => {
                check_range("layers", layers, MAX_LAYERS)?;
                check_range("heads", heads, MAX_HEADS)?;
                check_range("width", width, MAX_WIDTH)?;
                check_range("context", context, MAX_CONTEXT)?;
                if width % heads != 0 {
                    return Err(TrainerError::ModelSpec {
                        field: "heads",
                        message: format!("{heads} heads do not divide the width {width}"),
                    });
                }
            }
            Self::Mlp {
                hidden,
                layers,
                embed,
                context,
            } => {
                check_range("hidden", hidden, MAX_HIDDEN)?;
                check_range("layers", layers, MAX_LAYERS)?;
                check_range("embed", embed, MAX_WIDTH)?;
                check_range("context", context, MAX_CONTEXT)?;
            }
        }
        Ok(())
    }

    /// Tokens the model reads per sequence.
    pub fn context(&self) -> usize {
        match *self {
            Self::Transformer { context, .. } | Self::Mlp { context, .. } => context,
        }
    }

    /// Positions whose prediction the loss averages, per sequence (`context` for the
    /// transformer, 1 for the MLP).
    pub fn predictions_per_sequence(&self) -> usize {
        match *self {
            Self::Transformer { context, .. } => context,
            Self::Mlp { .. } => 1,
        }
    }

    /// Number of trainable parameters for a vocabulary of `vocab_size`.
    pub fn param_count(&self, vocab_size: usize) -> usize {
        let v = vocab_size;
        match *self {
            Self::Transformer {
                layers,
                width: c,
                context: t,
                ..
            } => {
                let block = 2 * (2 * c) // ln_1, ln_2
                    + (c * 3 * c + 3 * c) // attn.c_attn
                    + (c * c + c) // attn.c_proj
                    + (c * 4 * c + 4 * c) // mlp.c_fc
                    + (4 * c * c + c); // mlp.c_proj
                v * c + t * c + layers * block + 2 * c + c * v
            }
            Self::Mlp {
                hidden,
                layers,
                embed,
                context,
            } => {
                let first = context * embed * hidden + hidden;
                let rest = (layers - 1) * (hidden * hidden + hidden);
                v * embed + first + rest + hidden * v + v
            }
        }
    }

    /// The JSON form, for logs and reports.
    pub fn describe(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| format!("{self:?}"))
    }
}

/// How [`initialize`] sets one tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InitRule {
    /// All zeros (biases).
    Zeros,
    /// All ones (LayerNorm weights).
    Ones,
    /// Normal(0, std), drawn on the CPU generator.
    Normal {
        /// Standard deviation.
        std: f64,
    },
}

/// The initialization of the tensor called `name` with shape `shape` in a model of `spec`.
///
/// Transformer (nanoGPT): biases zero, LayerNorm weight one, `*.c_proj.weight`
/// N(0, 0.02/√(2·layers)), every other weight and both embeddings N(0, 0.02).
/// MLP: biases zero, `wte.weight` N(0, 1), hidden weights N(0, 1/√fan_in), `head.weight`
/// N(0, 0.02) so the initial loss is close to ln V.
pub fn init_rule(spec: &ModelSpec, name: &str, shape: &[i64]) -> InitRule {
    if name.ends_with(".bias") {
        return InitRule::Zeros;
    }
    match *spec {
        ModelSpec::Transformer { layers, .. } => {
            if name.contains("ln_") {
                InitRule::Ones
            } else if name.ends_with("c_proj.weight") {
                InitRule::Normal {
                    std: 0.02 / (2.0 * layers as f64).sqrt(),
                }
            } else {
                InitRule::Normal { std: 0.02 }
            }
        }
        ModelSpec::Mlp { .. } => {
            if name == "wte.weight" {
                InitRule::Normal { std: 1.0 }
            } else if name == "head.weight" {
                InitRule::Normal { std: 0.02 }
            } else {
                let fan_in = shape.get(1).copied().unwrap_or(1).max(1);
                InitRule::Normal {
                    std: 1.0 / (fan_in as f64).sqrt(),
                }
            }
        }
    }
}

/// libtorch's generator is process-wide: two models initialized at once (an auditor's beside a
/// trainer's, tests side by side) would interleave their draws.
static INIT_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Initializes `named` (sorted by name) in order after `tch::manual_seed(seed)`: values are drawn
/// on the CPU and copied to each tensor's device, so CPU and CUDA peers start identically. One
/// initialization at a time in the process.
pub(crate) fn initialize(
    spec: &ModelSpec,
    named: &[(String, Tensor)],
    seed: i64,
) -> Result<(), TchError> {
    let _serial = INIT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(seed);
    let _guard = tch::no_grad_guard();
    for (name, tensor) in named {
        let shape = tensor.size();
        let values = match init_rule(spec, name, &shape) {
            InitRule::Zeros => Tensor::f_zeros(&shape, (Kind::Float, Device::Cpu))?,
            InitRule::Ones => Tensor::f_ones(&shape, (Kind::Float, Device::Cpu))?,
            InitRule::Normal { std } => {
                Tensor::f_empty(&shape, (Kind::Float, Device::Cpu))?.f_normal_(0.0, std)?
            }
        };
        let mut target = tensor.shallow_clone();
        target.f_copy_(&values)?;
    }
    Ok(())
}

/// A trainable tensor of `dims`, zero until [`initialize`], in the decay group when it is a
/// matrix.
fn param(path: &Path, name: &str, dims: &[i64]) -> Result<Tensor, TchError> {
    let group = if dims.len() >= 2 {
        DECAY_GROUP
    } else {
        NO_DECAY_GROUP
    };
    path.set_group(group).f_zeros(name, dims)
}

struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    fn new(path: &Path, inputs: i64, outputs: i64, bias: bool) -> Result<Self, TchError> {
        Ok(Self {
            weight: param(path, "weight", &[outputs, inputs])?,
            bias: if bias {
                Some(param(path, "bias", &[outputs])?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, self.bias.as_ref())
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    width: i64,
}

impl LayerNorm {
    fn new(path: &Path, width: i64) -> Result<Self, TchError> {
        Ok(Self {
            weight: param(path, "weight", &[width])?,
            bias: param(path, "bias", &[width])?,
            width,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_layer_norm(
            [self.width],
            Some(&self.weight),
            Some(&self.bias),
            LAYER_NORM_EPS,
            true,
        )
    }
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_c_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    mlp_c_proj: Linear,
}

pub(crate) struct Transformer {
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    heads: i64,
    width: i64,
    context: i64,
    vocab_size: i64,
}

pub(crate) struct Mlp {
    wte: Tensor,
    hidden: Vec<Linear>,
    head: Linear,
    context: i64,
}

/// A built model whose tensors live in a var store.
pub(crate) enum Model {
    Transformer(Box<Transformer>),
    Mlp(Mlp),
}

impl Model {
    /// Creates the model's variables under `root` (all zero: see [`initialize`]). Names follow
    /// nanoGPT without its `transformer.` prefix, as `testnet/bench/ddp_train.py` names them:
    /// `wte.weight`, `h.0.attn.c_attn.weight`, `ln_f.bias`, `lm_head.weight`; for the MLP
    /// `wte.weight`, `hidden.0.weight`, `head.weight`.
    pub(crate) fn new(spec: &ModelSpec, vocab_size: usize, root: &Path) -> Result<Self, TchError> {
        let v = vocab_size as i64;
        match *spec {
            ModelSpec::Transformer {
                layers,
                heads,
                width,
                context,
            } => {
                let c = width as i64;
                let wte = param(&(root / "wte"), "weight", &[v, c])?;
                let wpe = param(&(root / "wpe"), "weight", &[context as i64, c])?;
                let blocks = (0..layers)
                    .map(|i| {
                        let h = root / "h" / i;
                        Ok(Block {
                            ln_1: LayerNorm::new(&(&h / "ln_1"), c)?,
                            c_attn: Linear::new(&(&h / "attn" / "c_attn"), c, 3 * c, true)?,
                            attn_c_proj: Linear::new(&(&h / "attn" / "c_proj"), c, c, true)?,
                            ln_2: LayerNorm::new(&(&h / "ln_2"), c)?,
                            c_fc: Linear::new(&(&h / "mlp" / "c_fc"), c, 4 * c, true)?,
                            mlp_c_proj: Linear::new(&(&h / "mlp" / "c_proj"), 4 * c, c, true)?,
                        })
                    })
                    .collect::<Result<Vec<_>, TchError>>()?;
                let ln_f = LayerNorm::new(&(root / "ln_f"), c)?;
                let lm_head = Linear::new(&(root / "lm_head"), c, v, false)?;
                Ok(Self::Transformer(Box::new(Transformer {
                    wte,
                    wpe,
                    blocks,
                    ln_f,
                    lm_head,
                    heads: heads as i64,
                    width: c,
                    context: context as i64,
                    vocab_size: v,
                })))
            }
            ModelSpec::Mlp {
                hidden,
                layers,
                embed,
                context,
            } => {
                let wte = param(&(root / "wte"), "weight", &[v, embed as i64])?;
                let mut inputs = (context * embed) as i64;
                let mut layers_out = Vec::with_capacity(layers);
                for i in 0..layers {
                    layers_out.push(Linear::new(
                        &(root / "hidden" / i),
                        inputs,
                        hidden as i64,
                        true,
                    )?);
                    inputs = hidden as i64;
                }
                let head = Linear::new(&(root / "head"), inputs, v, true)?;
                Ok(Self::Mlp(Mlp {
                    wte,
                    hidden: layers_out,
                    head,
                    context: context as i64,
                }))
            }
        }
    }

    /// Mean cross-entropy of a batch of sequences, `sequences` of shape (B, context + 1) int64.
    /// Transformer: inputs `x[.., 0..T]`, targets `x[.., 1..T+1]`, averaged over all B×T
    /// positions. MLP: input `x[.., 0..T]`, target `x[.., T]`, averaged over the batch.
    pub(crate) fn loss(&self, sequences: &Tensor) -> Result<Tensor, TchError> {
        match self {
            Self::Transformer(model) => model.loss(sequences),
            Self::Mlp(model) => model.loss(sequences),
        }
    }
}

impl Transformer {
    fn loss(&self, sequences: &Tensor) -> Result<Tensor, TchError> {
        let (b, _) = sequences.size2()?;
        let (t, c, h) = (self.context, self.width, self.heads);
        let inputs = sequences.f_narrow(1, 0, t)?;
        let targets = sequences.f_narrow(1, 1, t)?;
        let positions = Tensor::f_arange(t, (Kind::Int64, sequences.device()))?;
        let token_embeddings = Tensor::f_embedding(&self.wte, &inputs, -1, false, false)?;
        let position_embeddings = Tensor::f_embedding(&self.wpe, &positions, -1, false, false)?;
        let mut x = token_embeddings.f_add(&position_embeddings)?;
        for block in &self.blocks {
            let qkv = block.c_attn.forward(&block.ln_1.forward(&x)?)?;
            let heads = qkv
                .f_split(c, 2)?
                .into_iter()
                .map(|part| part.f_view([b, t, h, c / h])?.f_transpose(1, 2))
                .collect::<Result<Vec<_>, TchError>>()?;
            let [q, k, v] = heads.as_slice() else {
                return Err(TchError::Shape("c_attn did not split into q, k, v".into()));
            };
            let attended = Tensor::f_scaled_dot_product_attention(
                q,
                k,
                v,
                None::<&Tensor>,
                0.0,
                true,
                None,
                false,
            )?
            .f_transpose(1, 2)?
            .f_contiguous()?
            .f_view([b, t, c])?;
            x = x.f_add(&block.attn_c_proj.forward(&attended)?)?;
            let hidden = block
                .c_fc
                .forward(&block.ln_2.forward(&x)?)?
                .f_gelu("none")?;
            x = x.f_add(&block.mlp_c_proj.forward(&hidden)?)?;
        }
        let logits = self.lm_head.forward(&self.ln_f.forward(&x)?)?;
        logits.f_view([-1, self.vocab_size])?.f_cross_entropy_loss(
            &targets.f_reshape([-1])?,
            None::<&Tensor>,
            Reduction::Mean,
            -100,
            0.0,
        )
    }
}

impl Mlp {
    fn loss(&self, sequences: &Tensor) -> Result<Tensor, TchError> {
        let (b, _) = sequences.size2()?;
        let inputs = sequences.f_narrow(1, 0, self.context)?;
        let targets = sequences.f_select(1, self.context)?;
        let mut x = Tensor::f_embedding(&self.wte, &inputs, -1, false, false)?.f_view([b, -1])?;
        for layer in &self.hidden {
            x = layer.forward(&x)?.f_gelu("none")?;
        }
        self.head.forward(&x)?.f_cross_entropy_loss(
            &targets,
            None::<&Tensor>,
            Reduction::Mean,
            -100,
            0.0,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelSpec {
        ModelSpec::Transformer {
            layers: 2,
            heads: 2,
            width: 16,
            context: 8,
        }
    }

    #[test]
    fn validation_names_the_field() {
        let spec = ModelSpec::Transformer {
            layers: 2,
            heads: 3,
            width: 16,
            context: 8,
        };
        match spec.validate() {
            Err(TrainerError::ModelSpec { field, .. }) => assert_eq!(field, "heads"),
            other => panic!("expected a heads error, got {other:?}"),
        }
        let error = ModelSpec::Transformer {
            layers: 65,
            heads: 1,
            width: 16,
            context: 8,
        }
        .validate()
        .expect_err("too many layers");
        assert!(error.to_string().contains("`layers`"), "{error}");
        let error = ModelSpec::Mlp {
            hidden: 16,
            layers: 1,
            embed: 0,
            context: 4,
        }
        .validate()
        .expect_err("zero embed");
        assert!(error.to_string().contains("`embed`"), "{error}");
        let error = ModelSpec::Transformer {
            layers: 1,
            heads: 1,
            width: 16,
            context: 5000,
        }
        .validate()
        .expect_err("context too long");
        assert!(error.to_string().contains("`context`"), "{error}");
        assert!(tiny().validate().is_ok());
        assert!(ModelSpec::default().validate().is_ok());
    }

    #[test]
    fn specs_serialize_tagged_by_kind() {
        let json = serde_json::to_string(&tiny()).expect("json");
        assert_eq!(
            json,
            r#"{"kind":"transformer","layers":2,"heads":2,"width":16,"context":8}"#
        );
        let mlp: ModelSpec =
            serde_json::from_str(r#"{"kind":"mlp","hidden":32,"layers":2,"embed":8,"context":4}"#)
                .expect("json");
        assert_eq!(
            mlp,
            ModelSpec::Mlp {
                hidden: 32,
                layers: 2,
                embed: 8,
                context: 4
            }
        );
    }

    #[test]
    fn param_count_matches_the_variables() {
        for spec in [
            tiny(),
            ModelSpec::Mlp {
                hidden: 32,
                layers: 2,
                embed: 8,
                context: 4,
            },
        ] {
            let vs = tch::nn::VarStore::new(Device::Cpu);
            let _model = Model::new(&spec, 32, &vs.root()).expect("model");
            let total: usize = vs
                .variables()
                .values()
                .map(|t| t.size().iter().product::<i64>() as usize)
                .sum();
            assert_eq!(total, spec.param_count(32), "{spec:?}");
        }
    }
}
