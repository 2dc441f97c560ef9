//! The DiLoCo outer optimizer: SGD with Nesterov momentum on the averaged pseudo-gradient.
//!
//! After H inner steps each peer's pseudo-gradient is `θ_start − θ_after`; the peers average them
//! (see [`crate::contribution::aggregate`]) and every peer applies the same outer step to the same
//! starting parameters, so the models stay bit-identical. The update is PyTorch's `SGD(nesterov=
//! True, dampening=0)`, as in the DiLoCo paper (outer learning rate 0.7, momentum 0.9):
//!
//! ```text
//! buf ← μ·buf + g          g' ← g + μ·buf          θ ← θ − lr·g'
//! ```

/// Outer optimizer settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OuterConfig {
    /// Outer learning rate.
    pub lr: f32,
    /// Nesterov momentum.
    pub momentum: f32,
}

impl Default for OuterConfig {
    fn default() -> Self {
        Self {
            lr: 0.7,
            momentum: 0.9,
        }
    }
}

/// The pseudo-gradient of one peer: `start − after`, elementwise.
pub fn pseudo_gradient(start: &[f32], after: &[f32]) -> Vec<f32> {
    start.iter().zip(after).map(|(s, a)| s - a).collect()
}

/// Applies one outer step to `params` with the averaged pseudo-gradient `grad`, updating the
/// momentum buffer `buf` (zeros at first). All three slices have the model's length.
pub fn nesterov_step(params: &mut [f32], grad: &[f32], buf: &mut [f32], config: OuterConfig) {
    debug_assert!(params.len() == grad.len() && grad.len() == buf.len());
    for ((p, &g), b) in params.iter_mut().zip(grad).zip(buf.iter_mut()) {
        *b = config.momentum * *b + g;
        let step = g + config.momentum * *b;
        *p -= config.lr * step;
    }
}

/// AdamW settings of the `sync` strategy's shared optimizer (PyTorch's `AdamW`: decoupled weight
/// decay, bias-corrected moments).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator term.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// One AdamW step on `params` with the averaged gradient `grad`; `m` and `v` are the moment
/// buffers (zeros at first) and `step` the 1-based step count. Plain f32 arithmetic in a fixed
/// order, so every peer computes the same bits.
pub fn adamw_step(
    params: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: u64,
    config: AdamWConfig,
) {
    let step = step.max(1) as i32;
    let correction1 = 1.0 - config.beta1.powi(step);
    let correction2 = 1.0 - config.beta2.powi(step);
    for (((p, &g), m), v) in params
        .iter_mut()
        .zip(grad)
        .zip(m.iter_mut())
        .zip(v.iter_mut())
    {
        *p *= 1.0 - config.lr * config.weight_decay;
        *m = config.beta1 * *m + (1.0 - config.beta1) * g;
        *v = config.beta2 * *v + (1.0 - config.beta2) * g * g;
        let m_hat = *m / correction1;
        let v_hat = *v / correction2;
        *p -= config.lr * m_hat / (v_hat.sqrt() + config.eps);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_step_moves_by_lr_times_one_plus_momentum() {
        let mut params = vec![1.0f32, -2.0];
        let mut buf = vec![0.0f32; 2];
        let config = OuterConfig {
            lr: 0.5,
            momentum: 0.9,
        };
        nesterov_step(&mut params, &[1.0, -1.0], &mut buf, config);
        assert_eq!(buf, vec![1.0, -1.0]);
        assert!((params[0] - (1.0 - 0.5 * 1.9)).abs() < 1e-6);
        assert!((params[1] - (-2.0 + 0.5 * 1.9)).abs() < 1e-6);
        // Second step with the same gradient: buf = 1.9, step = 1 + 0.9·1.9 = 2.71.
        nesterov_step(&mut params, &[1.0, -1.0], &mut buf, config);
        assert!((buf[0] - 1.9).abs() < 1e-6);
        assert!((params[0] - (1.0 - 0.5 * 1.9 - 0.5 * 2.71)).abs() < 1e-5);
    }

    #[test]
    fn adamw_first_step_moves_each_coordinate_by_about_lr() {
        // With bias correction the first step is lr · sign(g) (plus decay).
        let mut params = vec![1.0f32, -1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        let config = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        };
        adamw_step(&mut params, &[0.5, -2.0], &mut m, &mut v, 1, config);
        assert!((params[0] - (1.0 - 1e-3)).abs() < 1e-6);
        assert!((params[1] - (-1.0 + 1e-3)).abs() < 1e-6);
    }

    #[test]
    fn with_lr_one_and_no_momentum_the_outer_step_is_plain_averaging() {
        // θ − (θ − mean(θ_i)) = mean(θ_i): DiLoCo with lr 1, μ 0 is FedAvg.
        let start = vec![1.0f32, 1.0];
        let after = [vec![0.0f32, 2.0], vec![0.5, 3.0]];
        let grads: Vec<Vec<f32>> = after.iter().map(|a| pseudo_gradient(&start, a)).collect();
        let avg: Vec<f32> = (0..2).map(|i| (grads[0][i] + grads[1][i]) / 2.0).collect();
        let mut params = start.clone();
        let mut buf = vec![0.0; 2];
        nesterov_step(
            &mut params,
            &avg,
            &mut buf,
            OuterConfig {
                lr: 1.0,
                momentum: 0.0,
            },
        );
        assert_eq!(params, vec![0.25, 2.5]);
    }
}
