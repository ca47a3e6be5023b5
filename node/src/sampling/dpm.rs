//! DPM-Solver++ (Lu et al. 2022) of order 2, multistep, midpoint form, and its SDE variant
//! (diffusers' `DPMSolverMultistepScheduler` with `dpmsolver++` / `sde-dpmsolver++`): x in
//! variance-preserving form, updates from the model's x₀ estimates in log-SNR time. The first
//! step and the last (to σ = 0) are first order, as diffusers does.

use ::burn::tensor::Tensor;
use ::burn::tensor::backend::Backend;

use super::{Prediction, alpha_sigma, x0_vp};
use crate::error::Result;

/// Runs the solver over `sigmas` (n + 1 levels, the last 0) from `x`; `report(k)` after each
/// step. `sde` adds the stochastic term with `noise(k)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run<B: Backend>(
    sde: bool,
    prediction: Prediction,
    sigmas: &[f64],
    timesteps: &[f32],
    mut x: Tensor<B, 4>,
    model: &mut impl FnMut(Tensor<B, 4>, f32) -> Result<Tensor<B, 4>>,
    noise: &mut impl FnMut(usize) -> Tensor<B, 4>,
    report: &mut impl FnMut(usize) -> Result<()>,
    blend: &mut impl FnMut(usize, Tensor<B, 4>) -> Tensor<B, 4>,
) -> Result<Tensor<B, 4>> {
    let n = timesteps.len();
    let mut previous: Option<Tensor<B, 4>> = None;
    for (k, &t) in timesteps.iter().enumerate() {
        let (s, next) = (sigmas[k], sigmas[k + 1]);
        let (_, sigma_s) = alpha_sigma(s);
        let out = model(x.clone(), t)?;
        let x0 = x0_vp(prediction, &x, out, s);
        if next == 0.0 {
            // σ = 0: the solution is the model's x₀ (first order, any variant).
            x = x0.clone();
        } else {
            let (alpha_t, sigma_t) = alpha_sigma(next);
            // λ = ln(α/σ) = −ln(σ_k-diffusion); h = λₜ − λₛ.
            let h = (s / next).ln();
            // With the previous x₀ (not at the first step): D = x₀ + (x₀ − x₀_prev)/(2 r).
            let d = match &previous {
                Some(m1) if k > 0 && k + 1 < n => {
                    let h0 = (sigmas[k - 1] / s).ln();
                    let half_over_r = 0.5 * h / h0;
                    x0.clone() + (x0.clone() - m1.clone()).mul_scalar(half_over_r as f32)
                }
                _ => x0.clone(),
            };
            x = if sde {
                let e = (-h).exp();
                x.mul_scalar((sigma_t / sigma_s * e) as f32)
                    + d.mul_scalar((alpha_t * (1.0 - e * e)) as f32)
                    + noise(k).mul_scalar((sigma_t * (1.0 - e * e).sqrt()) as f32)
            } else {
                x.mul_scalar((sigma_t / sigma_s) as f32)
                    - d.mul_scalar((alpha_t * ((-h).exp() - 1.0)) as f32)
            };
        }
        previous = Some(x0);
        x = blend(k + 1, x);
        report(k)?;
    }
    Ok(x)
}
