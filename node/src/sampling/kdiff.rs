//! Euler, Euler ancestral and Heun in k-diffusion form: x lives in σ-space (x = x₀ + σ·ε), the
//! model sees x / √(σ² + 1), and each step follows dx/dσ = (x − x₀)/σ (diffusers'
//! `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`, `HeunDiscreteScheduler`).

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

use super::{Prediction, Sampler, x0_sigma};
use crate::error::Result;

/// The model at noise level `sigma` (timestep `t`): its x₀ estimate for `x`.
fn denoise<B: Backend>(
    model: &mut impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
    prediction: Prediction,
    x: &Tensor<B, 4>,
    sigma: f64,
    t: f32,
) -> Result<Tensor<B, 4>> {
    let input = x.clone().div_scalar((sigma * sigma + 1.0).sqrt() as f32);
    let out = model(input, t)?;
    Ok(x0_sigma(prediction, x, out, sigma))
}

/// Runs `sampler` over `sigmas` (n + 1 levels, the last 0) from `x` (already scaled to the first
/// level); `report(k)` after each step, `blend(level, x)` on each result.
#[allow(clippy::too_many_arguments)]
pub(super) fn run<B: Backend>(
    sampler: Sampler,
    prediction: Prediction,
    sigmas: &[f64],
    timesteps: &[f32],
    mut x: Tensor<B, 4>,
    model: &mut impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
    noise: &mut impl FnMut(usize) -> Tensor<B, 4>,
    report: &mut impl FnMut(usize) -> Result<()>,
    blend: &mut impl FnMut(usize, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Result<Tensor<B, 4>> {
    for (k, &t) in timesteps.iter().enumerate() {
        let (sigma, next) = (sigmas[k], sigmas[k + 1]);
        let x0 = denoise(model, prediction, &x, sigma, t)?;
        let d = (x.clone() - x0).div_scalar(sigma as f32);
        x = match sampler {
            Sampler::EulerA => {
                let up = (next * next * (sigma * sigma - next * next) / (sigma * sigma)).sqrt();
                let down = (next * next - up * up).sqrt();
                x + d.mul_scalar((down - sigma) as f32) + noise(k).mul_scalar(up as f32)
            }
            Sampler::Heun if next > 0.0 => {
                let dt = (next - sigma) as f32;
                // diffusers runs Heun as two scheduler steps; inpainting blends after each.
                let predicted = blend(k + 1, x.clone() + d.clone().mul_scalar(dt));
                let x0 = denoise(model, prediction, &predicted, next, timesteps[k + 1])?;
                let d2 = (predicted - x0).div_scalar(next as f32);
                x + (d + d2).mul_scalar(0.5 * dt)
            }
            _ => x + d.mul_scalar((next - sigma) as f32),
        };
        x = blend(k + 1, x);
        report(k)?;
    }
    Ok(x)
}
