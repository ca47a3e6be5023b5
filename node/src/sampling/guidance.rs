//! Classifier-free guidance and guidance rescale, as diffusers' pipelines apply them to the
//! model's output before the sampler's step.

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

/// Classifier-free guidance: the unconditional prediction moved `scale` times toward the
/// conditional one.
pub fn guided<B: Backend>(uncond: Tensor<B, 4>, cond: Tensor<B, 4>, scale: f32) -> Tensor<B, 4> {
    uncond.clone() + (cond - uncond).mul_scalar(scale)
}

/// Guidance rescale (Lin et al. 2023, §3.4; diffusers' `rescale_noise_cfg`): the guided output
/// scaled to the conditional output's standard deviation (per batch item, unbiased), blended
/// with the unscaled one by `phi` (0: unchanged, 1: fully rescaled).
pub fn rescaled<B: Backend>(guided: Tensor<B, 4>, cond: &Tensor<B, 4>, phi: f32) -> Tensor<B, 4> {
    if phi <= 0.0 {
        return guided;
    }
    let [n, c, h, w] = guided.dims();
    let std = |t: Tensor<B, 4>| t.reshape([n, c * h * w]).var(1).sqrt();
    let ratio = (std(cond.clone()) / std(guided.clone())).reshape([n, 1, 1, 1]);
    let full = guided.clone() * ratio;
    full.mul_scalar(phi) + guided.mul_scalar(1.0 - phi)
}
