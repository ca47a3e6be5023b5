//! Euler, Euler ancestral, Heun and DPM++ SDE in k-diffusion form: x lives in σ-space
//! (x = x₀ + σ·ε), the model sees x / √(σ² + 1), and each step follows dx/dσ = (x − x₀)/σ
//! (diffusers' `EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`,
//! `HeunDiscreteScheduler`, `DPMSolverSDEScheduler`).

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

/// The levels a run walks.
pub(super) struct Levels<'a> {
    /// n + 1 noise levels, the last 0.
    pub sigmas: &'a [f64],
    /// The timestep of each of the first n.
    pub timesteps: &'a [f32],
    /// DPM++ SDE: the timestep of each step's midpoint (all steps but the last).
    pub mids: &'a [f32],
}

/// One stochastic DPM-Solver++ stage from noise level `from` to `to` with the x₀ estimate
/// `x0` and the Brownian increment `w` (unit variance): ancestral split of `to` into
/// σ_down (deterministic) and σ_up (fresh noise), as `DPMSolverSDEScheduler.step`.
fn sde_stage<B: Backend>(
    x: &Tensor<B, 4>,
    x0: &Tensor<B, 4>,
    from: f64,
    to: f64,
    w: Tensor<B, 4>,
) -> Tensor<B, 4> {
    let up = to.min((to * to * (from * from - to * to) / (from * from)).sqrt());
    let down = (to * to - up * up).sqrt();
    x0.clone() + (x.clone() - x0.clone()).mul_scalar((down / from) as f32) + w.mul_scalar(up as f32)
}

/// Runs `sampler` over `levels` from `x` (already scaled to the first level); `report(k)` after
/// each step, `blend(level, x)` on each result.
///
/// DPM++ SDE draws two unit Gaussians per step (`noise(2k)`, `noise(2k + 1)`) as the increments
/// of one Brownian path over σ, sampled exactly at the step's start, midpoint and end: the
/// midpoint stage sees the first increment, the full step the sum of both, so the two stages
/// of a step follow the same path (what `DPMSolverSDEScheduler`'s Brownian tree provides;
/// the draws differ from torchsde's, the path's law does not).
#[allow(clippy::too_many_arguments)]
pub(super) fn run<B: Backend>(
    sampler: Sampler,
    prediction: Prediction,
    levels: Levels<'_>,
    mut x: Tensor<B, 4>,
    model: &mut impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
    noise: &mut impl FnMut(usize) -> Tensor<B, 4>,
    report: &mut impl FnMut(usize) -> Result<()>,
    blend: &mut impl FnMut(usize, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Result<Tensor<B, 4>> {
    let Levels {
        sigmas,
        timesteps,
        mids,
    } = levels;
    for (k, &t) in timesteps.iter().enumerate() {
        let (sigma, next) = (sigmas[k], sigmas[k + 1]);
        let x0 = denoise(model, prediction, &x, sigma, t)?;
        let d = (x.clone() - x0.clone()).div_scalar(sigma as f32);
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
            Sampler::DpmppSde if next > 0.0 => {
                let mid = (sigma * next).sqrt();
                let first = noise(2 * k);
                let staged = sde_stage(&x, &x0, sigma, mid, first.clone());
                let x0 = denoise(model, prediction, &staged, mid, mids[k])?;
                let w = (first.mul_scalar((sigma - mid).sqrt() as f32)
                    + noise(2 * k + 1).mul_scalar((mid - next).sqrt() as f32))
                .div_scalar((sigma - next).sqrt() as f32);
                sde_stage(&x, &x0, sigma, next, w)
            }
            _ => x + d.mul_scalar((next - sigma) as f32),
        };
        x = blend(k + 1, x);
        report(k)?;
    }
    Ok(x)
}
